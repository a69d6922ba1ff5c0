"""QLoRA (`quantization: nf4 | int8`): a tiny Llama loaded quantized by bitsandbytes trains its LoRA adapter only,
checkpoints hold the adapter only and resume exactly, and the adapter merges into the full-precision base with
no error beyond the base's quantization error."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mftcoder.config import ConfigError, build_config
from mftcoder.merge import merge
from mftcoder.model import quantized_loading
from mftcoder.train.distributed import DistEnv
from mftcoder.train.loop import Trainer, train

bnb = pytest.importorskip("bitsandbytes")

# Every decoder Linear becomes a bitsandbytes layer even at hidden size 64 (checked below); the output layer stays as is
TINY_LLAMA = dict(vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False)
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-initialised Llama saved as a local model directory (full precision) with the shipped tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mftcoder.model import SHIPPED_TOKENIZER

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder)
    return folder


def settings(small_tasks, model_dir, output_dir, **overrides) -> dict:
    return {**small_tasks, "pretrained_model_path": str(model_dir), "output_dir": str(output_dir),
            "peft_type": "lora", "quantization": "nf4", "lora_dropout": 0.1, "seq_length": 96,
            "per_device_train_batch_size": 2, "learning_rate": 2e-2, "num_warmup_steps": 0, "max_steps": 6,
            "checkpointing_steps": 3, "evaluation_steps": 6, "data_split": "80,20,0", "log_interval": 1,
            "per_device_valid_batch_size": 6, **overrides}


@pytest.fixture(scope="module")
def nf4_run(small_tasks, tiny_llama, tmp_path_factory):
    """Six QLoRA steps (checkpoint at 3 and 6), with the quantized base weights as they were before training."""
    out = tmp_path_factory.mktemp("nf4-run")
    trainer = Trainer(build_config(settings(small_tasks, tiny_llama, out))[0], DistEnv())
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    result = trainer.run()
    return trainer, result, base_before


def test_nf4_trains_only_the_adapter_on_a_frozen_4bit_base(nf4_run):
    trainer, result, base_before = nf4_run
    quantized = {name.split(".")[-2] for name, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == TARGETS  # every decoder Linear is 4-bit (the LoRA layers' base_layer) ...
    linear4bit = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8 for m in linear4bit)
    assert not isinstance(trainer.model.get_base_model().lm_head, bnb.nn.Linear4bit)  # ... the output layer is not
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(linear4bit)
    after = dict(trainer.model.named_parameters())
    assert base_before.keys() == {n for n, p in after.items() if not p.requires_grad}
    assert all(torch.equal(base_before[n], after[n]) for n in base_before)  # the frozen base never moved
    assert trainer.padding_mode == "pack"  # the start-up check found packed samples isolated on the 4-bit model
    # The loss falls (measured: validation 10.876 before the first step, 10.715 after step 6; a random base).
    first, last = result.evaluations[0]["loss"], result.evaluations[-1]["loss"]
    assert last < first - 0.08
    assert np.mean(result.step_losses[-2:]) < np.mean(result.step_losses[:2])
    # Gradients still flow back through the frozen 4-bit layers after evaluations (bitsandbytes' CPU inference
    # layout would have cut them): layer 0's LoRA gradient is the same before and after an eval-mode forward.
    ids = torch.arange(100, 140)[None]
    before_eval = layer0_lora_gradient(trainer.model, ids)
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(input_ids=ids, use_cache=False)
    after_eval = layer0_lora_gradient(trainer.model, ids)
    assert before_eval.abs().sum() > 0 and torch.equal(before_eval, after_eval)


def layer0_lora_gradient(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The gradient of the first decoder layer's first LoRA B matrix (it needs the gradient from all layers above)."""
    model.train()
    torch.manual_seed(0)  # the same LoRA dropout each time
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    name, param = next((n, p) for n, p in model.named_parameters() if ".layers.0." in n and "lora_B" in n)
    gradient = param.grad.clone()
    model.zero_grad(set_to_none=True)
    return gradient


def test_a_qlora_checkpoint_holds_the_adapter_only_and_resumes_exactly(nf4_run, small_tasks, tiny_llama, tmp_path):
    trainer, full, _ = nf4_run
    checkpoint = full.final_checkpoint
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("*.bin"))
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    lora_bytes = sum(p.numel() * 4 for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert sum(t.numel() * t.element_size() for t in adapter.values()) == lora_bytes
    size = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert lora_bytes <= size < lora_bytes + 16_384  # the LoRA matrices and the safetensors header, nothing else
    # Resume from step 3 in another folder: the same losses and the same final adapter as the uninterrupted run.
    shutil.copytree(full.output_dir / "checkpoint-3", tmp_path / "checkpoint-3")
    resumed = train(build_config(settings(small_tasks, tiny_llama, tmp_path, resume_from_checkpoint="auto"))[0])
    assert resumed.state.step == 6
    assert resumed.step_losses == full.step_losses[3:]
    final = load_file(resumed.final_checkpoint / "adapter_model.safetensors")
    assert all(torch.equal(final[k], adapter[k]) for k in adapter)


def test_merge_adds_no_error_beyond_the_quantization_of_the_base(nf4_run, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, result, _ = nf4_run
    adapter = result.final_checkpoint
    merged_dir = merge(tiny_llama, adapter, tmp_path / "merged")
    ids = torch.from_numpy(trainer.data.per_task[0].sample(int(trainer.data.per_task[0].train[0]))[0][:48]
                           .astype(np.int64))[None]
    qlora = trainer.model.eval()

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()

    full_base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    base_fp = logits(full_base)
    with qlora.disable_adapter():
        base_q = logits(qlora)
    with_q = logits(qlora)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir).eval())
    unmerged = logits(PeftModel.from_pretrained(full_base, adapter).eval())
    # The merged model is exactly the full-precision base with the adapter applied by PEFT (float32 rounding only;
    # measured 3.6e-7).
    assert (merged - unmerged).abs().max() < 1e-5
    # The merged model and the QLoRA model it came from differ by the nf4 quantization error of the base weights
    # only: the adapter was trained on the 4-bit base and now sits on the full-precision one. The yardstick is the
    # base's own quantization error: the logit gap between the full-precision and the nf4 base, both without adapter.
    # Measured (max |logit difference|, logits up to 0.81): base quantization 0.101, merged vs QLoRA 0.051 (0.5 of
    # it); the adapter itself moves logits by 1.07. Bound: between 0.1 and 1 times the base's quantization gap, i.e.
    # the merge adds no error beyond quantization, and the gap is that error (not zero: the QLoRA model really
    # computed with 4-bit weights).
    quantization_gap = (base_fp - base_q).abs().max().item()
    merge_gap = (merged - with_q).abs().max().item()
    assert 0.1 * quantization_gap < merge_gap <= quantization_gap
    assert (unmerged - base_fp).abs().max() > 10 * merge_gap  # the adapter's effect dwarfs the quantization error


def test_int8_loads_and_trains_a_step(small_tasks, tiny_llama, tmp_path):
    trainer = Trainer(build_config(settings(small_tasks, tiny_llama, tmp_path, quantization="int8", max_steps=1,
                                            evaluation_strategy="no"))[0], DistEnv())
    int8 = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(m.weight.dtype == torch.int8 and not m.weight.requires_grad for m in int8)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.run()
    assert len(result.step_losses) == 1 and np.isfinite(result.step_losses[0])
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_quantization_refusals_name_the_key(small_tasks, tiny_llama, tmp_path, monkeypatch):
    values = settings(small_tasks, tiny_llama, tmp_path)
    with pytest.raises(ConfigError, match=r"^quantization: nf4 is not supported with distributed_strategy: fsdp"):
        build_config({**values, "distributed_strategy": "fsdp"})
    random_init = {**values, "pretrained_model_path": None, "model_config": "tiny-test"}
    with pytest.raises(ConfigError, match=r"^quantization: nf4 .* random-initialised model_config model"):
        Trainer(build_config(random_init)[0], DistEnv())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match=r"^quantization: nf4 needs bitsandbytes: pip install bitsandbytes"):
        quantized_loading(build_config(values)[0])
