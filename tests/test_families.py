"""Model families through the training path: a LoRA step as the trainer runs it, the family's LoRA targets,
merge, packed == unpacked; the model's own loss where logits are transformed; the start-up packing check."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mftcoder.config import ConfigError, build_config
from mftcoder.data.batching import collate
from mftcoder.families import check_attention, computes_in_float32, family, packs_as_one_row
from mftcoder.loss import SupervisedLM
from mftcoder.merge import merge
from mftcoder.train.distributed import DistEnv
from mftcoder.train.loop import Trainer
from mftcoder.train.model_checks import CheckContext, check_runner, float32_probe, leak_gap, position_gap

COMMON = dict(vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=256, tie_word_embeddings=False)
GQA = dict(num_key_value_heads=2)
FAMILIES = {
    "gpt_neox": dict(COMMON, rotary_pct=0.25),
    "llama": dict(COMMON, **GQA),
    "qwen2": dict(COMMON, **GQA),
    "qwen3": dict(COMMON, **GQA, head_dim=16),
    "mistral": dict(COMMON, **GQA, sliding_window=16),  # shorter than the samples: the window matters
    "starcoder2": dict(COMMON, **GQA, sliding_window=None),
    "gpt_bigcode": dict(vocab_size=50304, n_embd=64, n_layer=2, n_head=4, n_positions=256),  # absolute positions
    "gemma2": dict(COMMON, **GQA, head_dim=16, sliding_window=16),  # soft-capped attention and logits
    "mixtral": dict(COMMON, **GQA, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
}
FUSED = {name: name not in ("gemma2", "mixtral") for name in FAMILIES}


def model_config_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"model_type": name, **FAMILIES[name]}))
    return path


def trainer_for(small_tasks, tmp_path, name, **overrides) -> Trainer:
    values = {**small_tasks, "model_config": str(model_config_file(tmp_path, name)), "output_dir": str(tmp_path / "run"),
              "seq_length": 96, "per_device_train_batch_size": 2, "learning_rate": 5e-2, "max_steps": 1,
              "evaluation_strategy": "no", "data_split": "80,20,0", "peft_type": "lora", "lora_dropout": 0.0,
              "overwrite_output_dir": True, **overrides}  # each trainer here is a fresh run
    return Trainer(build_config(values)[0], DistEnv())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_packs_and_merges(small_tasks, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = trainer_for(small_tasks, tmp_path, name)
    runner = trainer.runner
    assert trainer.padding_mode == "pack"  # the start-up check found packed samples isolated
    assert runner.fused_head == FUSED[name]
    # LoRA sits on exactly the family's target modules.
    wrapped = {n.split(".")[-1] for n, m in trainer.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(family(name).lora_targets)
    # Packed rows give each sample's per-token losses as when it runs alone (samples longer than any window).
    samples = [(*t.sample(int(r)), t.task.id) for t in trainer.data.per_task for r in t.train[:2]]
    assert min(len(ids) for ids, _, _ in samples) > 20
    runner.eval()  # (gpt_bigcode's config has dropout)
    with torch.no_grad():
        packed = runner(collate([samples[:3], samples[3:]], 1, packed=True))[1]
        apart = runner(collate([[s] for s in samples], 1))[1]
    runner.train()
    assert (packed - apart).abs().max() < 1e-4
    # One optimizer step through SupervisedLM as the trainer runs it moves the adapter.
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.run()
    assert len(result.step_losses) == 1 and np.isfinite(result.step_losses[0])
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # Merge: the merged model's logits are the base's with the adapter.
    merged = merge(tmp_path / "run" / "base-model", result.final_checkpoint, tmp_path / "merged")
    ids = torch.from_numpy(samples[0][0][:32].astype(np.int64))[None]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base-model")
        reference = PeftModel.from_pretrained(base, result.final_checkpoint).eval()(ids).logits
        folded = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert torch.allclose(folded, reference, atol=1e-4)


@pytest.mark.parametrize("name", ["gemma2", "mixtral"])
def test_the_loss_is_the_models_own(small_tasks, tmp_path, name):
    """Soft-capped logits (gemma2) and a router loss (mixtral): SupervisedLM's case1 loss equals the model's."""
    trainer = trainer_for(small_tasks, tmp_path, name, peft_type=None, weighted_loss_mode="case1")
    model, runner = trainer.model, trainer.runner
    with torch.no_grad():  # logits far from 0, where soft-capping bites (a random init's are all near 0)
        model.get_output_embeddings().weight.mul_(100.0)
    rows = [[(*t.sample(int(r)), t.task.id)] for t in trainer.data.per_task for r in t.train[:2]]
    batch = collate(rows, trainer.tokenizer.pad_token_id)
    labels = torch.where(batch.loss_mask, batch.targets, -100)
    model.eval()
    with torch.no_grad():
        ours, _ = runner(batch, torch.full((int(batch.loss_mask.sum()),), 1.0 / int(batch.loss_mask.sum())))
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        plain = F.cross_entropy(out.logits[batch.loss_mask].float(), batch.targets[batch.loss_mask])
        # transformers shifts labels itself: give it unshifted labels.
        own = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                    labels=torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)).loss
    assert float(ours) == pytest.approx(float(own), rel=1e-5)
    if name == "mixtral":
        assert float(own - plain) == pytest.approx(float(model.config.router_aux_loss_coef * out.aux_loss), abs=1e-5)
        assert float(out.aux_loss) > 1.0  # the router loss is there (coefficient 0.001)
    else:  # the soft-cap changes the loss: the fused output layer would have been wrong
        fused = F.cross_entropy(model.get_output_embeddings()(
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        )[batch.loss_mask].float(), batch.targets[batch.loss_mask])
        assert abs(float(fused) - float(own)) > 1.0


LEAKY_MODEL = '''
from transformers import LlamaForCausalLM, LlamaModel


class LeakyModel(LlamaModel):
    """Ignores position_ids, so packed samples are neither told apart nor positioned from 0."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


class LeakyForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = LeakyModel(config)
        self.post_init()
'''


@pytest.fixture(scope="module")
def leaky_model(tmp_path_factory):
    """A local model with its own code (trust_remote_code) whose attention does not isolate packed samples."""
    from transformers import AutoTokenizer, LlamaConfig

    from mftcoder.model import SHIPPED_TOKENIZER

    folder = tmp_path_factory.mktemp("leaky")
    (folder / "modeling_leaky.py").write_text(LEAKY_MODEL)
    config = LlamaConfig(**FAMILIES["llama"], auto_map={"AutoModelForCausalLM": "modeling_leaky.LeakyForCausalLM"})
    config.save_pretrained(folder)
    import importlib.util

    spec = importlib.util.spec_from_file_location("modeling_leaky", folder / "modeling_leaky.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    module.LeakyForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder)
    return folder


def test_packing_check_refuses_or_falls_back_on_a_leaky_model(small_tasks, tmp_path, leaky_model, capsys):
    values = {**small_tasks, "pretrained_model_path": str(leaky_model), "trust_remote_code": True,
              "output_dir": str(tmp_path / "run"), "seq_length": 96, "evaluation_strategy": "no", "max_steps": 1}
    with pytest.raises(ConfigError, match=r"padding_mode: pack: this model does not keep packed samples apart .*"
                                          r"use padding_mode: dynamic"):
        Trainer(build_config({**values, "padding_mode": "pack"})[0], DistEnv())
    trainer = Trainer(build_config(values)[0], DistEnv())  # padding_mode auto, the default
    assert trainer.padding_mode == "dynamic"
    err = capsys.readouterr()
    assert "warning: this model does not keep packed samples apart" in err.out + err.err
    assert trainer.reader.packed is False and len(trainer.run().step_losses) == 1
    # The same architecture without the wrapper packs.
    assert trainer_for(small_tasks, tmp_path, "llama", padding_mode="pack").padding_mode == "pack"


@pytest.mark.parametrize("name", ["gpt_neox", "llama"])
def test_attention_implementations_keep_packed_samples_apart_and_agree(small_tasks, tmp_path, name):
    """sdpa and eager: packed rows give each sample's own per-token losses, and both kernels give the same; under bf16
    autocast too (measured: identical, 0; the limits allow bf16 rounding), where no sample moves when the ones before it
    change."""
    losses = {}
    for kernel in ("sdpa", "eager"):
        (tmp_path / kernel).mkdir()
        trainer = trainer_for(small_tasks, tmp_path / kernel, name, attn_implementation=kernel, padding_mode="pack")
        assert trainer.model.config._attn_implementation == kernel
        samples = [(*t.sample(int(r)), t.task.id) for t in trainer.data.per_task for r in t.train[:2]]
        for bf16 in (False, True):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                packed = trainer.runner(collate([samples[:3], samples[3:]], 1, packed=True))[1]
                apart = trainer.runner(collate([[s] for s in samples], 1))[1]
            gap = (packed - apart).abs()
            assert (gap.max() < 5e-2 and gap.mean() < 5e-3) if bf16 else gap.max() < 1e-5
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        probes = [(ids[:24], np.ones(min(24, len(ids)), dtype=np.uint8), task) for ids, _, task in samples[::3]]
        assert leak_gap(trainer.runner, probes, 1, torch.device("cpu"), autocast) == 0
        losses[kernel] = packed
    assert (losses["sdpa"] - losses["eager"]).abs().max() < 5e-2  # the last ones computed: under bf16
    assert losses["sdpa"].mean() > 5  # a random model: losses near log(vocab), not a degenerate zero


def test_attention_kernels_that_cannot_train_here_are_refused(small_tasks, tmp_path):
    with pytest.raises(ConfigError, match="flex_attention has no backward pass on CPU"):
        trainer_for(small_tasks, tmp_path, "llama", attn_implementation="flex_attention")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU"):
            trainer_for(small_tasks, tmp_path, "llama", attn_implementation="flash_attention_2")


def _llama(kernel: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**FAMILIES["llama"], "vocab_size": 1000, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=kernel)


def _probe_samples(lengths=(20, 15)):
    rng = np.random.default_rng(0)
    return [(rng.integers(3, 1000, n).astype(np.int32), np.ones(n, dtype=np.uint8), 0) for n in lengths]


def test_a_kernel_that_sees_samples_only_in_one_row_gets_packed_rows_as_one_row():
    """flash-attention reads packed samples from position ids only in a batch of one row (varlen_attention.py emulates
    it on CPU). Several packed rows as rows leak; the same rows flattened into one are exactly each sample alone. The
    start-up check runs several rows, so it sees the leak and the flattened layout passes."""
    import varlen_attention

    model, samples, cpu = _llama(varlen_attention.NAME), _probe_samples(), torch.device("cpu")
    assert packs_as_one_row(varlen_attention.NAME) and not packs_as_one_row("sdpa")
    as_rows, flat = SupervisedLM(model), SupervisedLM(model, flat_packing=True)
    assert position_gap(as_rows, samples, 0, cpu) > 0.1 and leak_gap(as_rows, samples, 0, cpu) > 0.1
    assert position_gap(flat, samples, 0, cpu) < 1e-5 and leak_gap(flat, samples, 0, cpu) == 0
    context = CheckContext(cpu, contextlib.nullcontext(), exact=True)
    assert check_runner(as_rows, as_rows, "auto", samples, 0, context) == "dynamic"
    with pytest.raises(ConfigError, match="does not keep packed samples apart"):
        check_runner(as_rows, as_rows, "pack", samples, 0, context)
    assert check_runner(flat, flat, "auto", samples, 0, context) == "pack"


def test_start_up_checks_in_bf16_compare_what_bf16_noise_leaves_exact():
    """In bf16 each sample alone differs from it packed by rounding (>1e-4), so that comparison runs on a float32
    miniature of the model's code; the leak check runs the model as it trains (bf16 weights, or bf16 autocast) and is
    exact there: a sample's losses do not move at all when the samples before it change."""
    model, samples, cpu = _llama("sdpa", num_hidden_layers=4), _probe_samples(), torch.device("cpu")
    rng_before = torch.get_rng_state()
    probe = float32_probe(model.to(torch.bfloat16))
    assert type(probe) is type(model) and probe.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    assert {p.dtype for p in probe.parameters()} == {torch.float32} and probe.config._attn_implementation == "sdpa"
    assert torch.equal(torch.get_rng_state(), rng_before)  # building the probe did not move the run's RNG
    assert position_gap(SupervisedLM(probe), samples, 0, cpu) < 1e-5
    assert position_gap(SupervisedLM(model), samples, 0, cpu) > 1e-4  # bf16 noise alone, no leak
    assert leak_gap(SupervisedLM(model), samples, 0, cpu) == 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    assert leak_gap(SupervisedLM(model.float()), samples, 0, cpu, autocast) == 0
    # flash-attention has no float32: the miniature checks the model's code with sdpa (the leak check runs the real one)
    model.config._attn_implementation = "flash_attention_2"
    assert float32_probe(model).config._attn_implementation == "sdpa"


def test_flash_attention_needs_bf16_compute():
    """float32 weights outside autocast would reach flash-attention in float32, which it refuses (a crash at start-up)."""
    model = _llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not computes_in_float32(model, bf16=False)  # so the exact checks run on an sdpa miniature
    with pytest.raises(ConfigError, match="flash_attention_2 computes in bf16/fp16 only.*set bf16: true"):
        check_attention(model, torch.device("cuda"), bf16=False)
    check_attention(model, torch.device("cuda"), bf16=True)  # bf16 autocast
    check_attention(model.to(torch.bfloat16), torch.device("cuda"), bf16=False)  # bf16 weights
