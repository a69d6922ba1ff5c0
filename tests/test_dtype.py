"""Weights dtype (torch_dtype) and the dtype of saved weights (save_dtype): training weights stay as loaded, only
the saved copy is cast, resume stays exact, a bf16 base trains LoRA adapters in float32."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mftcoder.config import build_config
from mftcoder.model import SHIPPED_TOKENIZER, read_model_config, save_dtype, weights_dtype
from mftcoder.train.distributed import DistEnv
from mftcoder.train.loop import Trainer, train

TINY_LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=50304, tie_word_embeddings=False)


def make_config(small_tasks, output_dir: Path, **overrides):
    values = {**small_tasks, "output_dir": str(output_dir), "seq_length": 96, "per_device_train_batch_size": 2,
              "learning_rate": 2e-3, "max_steps": 2, "log_interval": 1, "evaluation_strategy": "no",
              "checkpointing_steps": 2, "data_split": "80,20,0", "num_warmup_steps": 0,
              "evaluate_before_training": False, "padding_mode": "dynamic", **overrides}
    if "pretrained_model_path" not in values:
        values["model_config"] = "tiny-test"
    return build_config(values)[0]


def safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes named in a safetensors file's header (no tensor is read)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    """A tiny random Llama saved in bfloat16 (its config.json says so), with the shipped tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("bf16-base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    model.to(torch.bfloat16).save_pretrained(directory)
    for file in SHIPPED_TOKENIZER.iterdir():
        shutil.copy(file, directory)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    return directory


def test_dtype_settings_resolve(small_tasks, tmp_path, bf16_base):
    auto = make_config(small_tasks, tmp_path)
    assert weights_dtype(auto) == torch.float32  # CPU: float32 for full fine-tuning and LoRA alike
    assert weights_dtype(make_config(small_tasks, tmp_path, peft_type="lora")) == torch.float32
    assert weights_dtype(make_config(small_tasks, tmp_path, torch_dtype="bfloat16")) == torch.bfloat16
    assert save_dtype(auto) == torch.float32  # a random-initialised model
    assert save_dtype(make_config(small_tasks, tmp_path, pretrained_model_path=str(bf16_base))) == torch.bfloat16
    assert save_dtype(make_config(small_tasks, tmp_path, save_dtype="float16")) == torch.float16
    old_style = tmp_path / "old"
    old_style.mkdir()
    (old_style / "config.json").write_text(json.dumps({**read_model_config("tiny-test"), "torch_dtype": "float16"}))
    assert save_dtype(make_config(small_tasks, tmp_path, pretrained_model_path=str(old_style))) == torch.float16


def test_full_fine_tuning_in_bf16_weights_comes_with_a_note(small_tasks):
    _, notices = build_config({**small_tasks, "model_config": "tiny-test", "torch_dtype": "bfloat16"})
    assert any("no float32 master weights" in n for n in notices)
    _, notices = build_config({**small_tasks, "model_config": "tiny-test", "torch_dtype": "bfloat16",
                               "peft_type": "lora"})
    assert not any("master weights" in n for n in notices)


def test_checkpoints_in_save_dtype_keep_float32_training_weights_and_an_exact_resume(small_tasks, tmp_path):
    common = dict(save_dtype="bfloat16", max_steps=4, checkpointing_steps=2)
    trainer = Trainer(make_config(small_tasks, tmp_path / "full", **common), DistEnv())
    full = trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # only the saved copy was cast
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert safetensors_dtypes(checkpoint / "model.safetensors") == {"BF16"}
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    exact = checkpoint / "resume" / "weights" / "model.safetensors"
    assert safetensors_dtypes(exact) == {"F32"}
    saved, kept = load_file(checkpoint / "model.safetensors"), load_file(exact)
    assert all(torch.equal(saved[k], kept[k].to(torch.bfloat16)) for k in saved)

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = train(make_config(small_tasks, tmp_path / "resumed", resume_from_checkpoint="auto", **common))
    assert resumed.step_losses == full.step_losses[2:]  # bitwise: resume read the float32 weights
    a = load_file(tmp_path / "full" / "checkpoint-4" / "resume" / "weights" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-4" / "resume" / "weights" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_saves_in_the_base_models_dtype_and_trains_in_float32(small_tasks, tmp_path, bf16_base):
    trainer = Trainer(make_config(small_tasks, tmp_path, pretrained_model_path=str(bf16_base), max_steps=1,
                                  checkpointing_steps=1), DistEnv())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # torch_dtype auto on CPU
    result = trainer.run()
    assert safetensors_dtypes(result.final_checkpoint / "model.safetensors") == {"BF16"}
    assert safetensors_dtypes(result.final_checkpoint / "resume" / "weights" / "model.safetensors") == {"F32"}
    # save_dtype float32 is lossless: no second copy
    again = train(make_config(small_tasks, tmp_path / "fp32", pretrained_model_path=str(bf16_base), max_steps=1,
                              checkpointing_steps=1, save_dtype="float32"))
    assert safetensors_dtypes(again.final_checkpoint / "model.safetensors") == {"F32"}
    assert not (again.final_checkpoint / "resume" / "weights").exists()


def test_a_lora_step_on_a_bf16_base_trains_float32_adapters(small_tasks, tmp_path, bf16_base):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(make_config(small_tasks, tmp_path / dtype, pretrained_model_path=str(bf16_base),
                                      peft_type="lora", torch_dtype=dtype, lora_dropout=0.0), DistEnv())
        params = dict(trainer.model.named_parameters())
        adapters = {n: p for n, p in params.items() if "lora_" in n}
        assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
        assert {p.dtype for n, p in params.items() if n not in adapters} == {getattr(torch, dtype)}
        before = {n: p.detach().clone() for n, p in adapters.items() if "lora_B" in n}  # zero at start
        losses[dtype] = trainer.run().step_losses
        assert all(not torch.equal(before[n], adapters[n]) for n in before)  # the adapters trained
        assert all(adapters[n].dtype == torch.float32 for n in before)
    assert all(math.isfinite(x) for x in losses["bfloat16"])
    # The same (bf16-representable) weights, computed in bf16 instead of float32, with float32 logits and
    # cross-entropy: both steps' losses agree within 1e-3 relative (measured here: 3e-6 before any update, 3e-5
    # after one; a random model's loss sits near ln(vocab), so this is a precision check, not a quality one).
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-3)


def test_the_random_base_of_a_lora_run_is_saved_in_save_dtype(small_tasks, tmp_path):
    result = train(make_config(small_tasks, tmp_path, peft_type="lora", save_dtype="float16", max_steps=1,
                               checkpointing_steps=1))
    assert safetensors_dtypes(tmp_path / "base-model" / "model.safetensors") == {"F16"}
    assert json.loads((tmp_path / "base-model" / "config.json").read_text())["dtype"] == "float16"
    assert safetensors_dtypes(result.final_checkpoint / "adapter_model.safetensors") == {"F32"}  # as trained
