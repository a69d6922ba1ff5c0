"""`mftcoder plan`: its components against exact counts on tiny models (parameters, LoRA's trainable parameters,
AdamW's state after a step, the tensors autograd keeps for backward), its JSON, and its answers for an unknown family
and a 70B model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mftcoder.config import build_config
from mftcoder.data.batching import collate
from mftcoder.loss import SupervisedLM
from mftcoder.model import lora_targets, parameter_groups, prepare_for_training, read_model_config
from mftcoder.plan.memory import (RunSetup, activation_bytes, head_backward_bytes, head_forward_bytes,
                                  head_saved_bytes, optimizer_bytes, optimizer_step_bytes, plan_memory,
                                  trainable_params)
from mftcoder.train.memory_meter import TensorBytes
from mftcoder.plan.planner import Target, make_plan
from mftcoder.plan.rates import CpuRates, measure_cpu_rates
from mftcoder.plan.shape import lora_layers, read_shape
from mftcoder.plan.timing import StepWork, cpu_step_terms, forward_passes, gpu_step_terms, step_flops, step_work

REPO = Path(__file__).resolve().parent.parent
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
NEOX = dict(read_model_config("tiny-test"), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, vocab_size=512)
LLAMA_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
SETTINGS = [{}, {"peft_type": "lora", "lora_dropout": 0.0}, {"peft_type": "lora", "lora_dropout": 0.05},
            {"checkpoint_activations": True}, {"peft_type": "lora", "checkpoint_activations": True}]


def packed_rows(rows: int, width: int, vocab: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rows):
        row, left = [], width
        while left:
            n = min(left, int(rng.integers(5, 40)))
            row.append((rng.integers(3, vocab, n).astype(np.int32), (rng.random(n) < 0.6).astype(np.uint8), 0))
            left -= n
        out.append(row)
    return out


def build(raw: dict, values: dict):
    config, _ = build_config(values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw), attn_implementation="sdpa")
    model = prepare_for_training(model, config).train()
    shape = read_shape(raw)
    batch = collate(packed_rows(2, 64, raw["vocab_size"]), 0, packed=True)
    run = RunSetup("lora" if config.peft_type else "full", 4, 4, config.lora_rank,
                   lora_layers(shape, lora_targets(config, shape.model_type)), config.lora_dropout > 0,
                   checkpointing=config.checkpoint_activations, rows_per_pass=2, row_tokens=64,
                   supervised_fraction=float(batch.loss_mask.sum()) / batch.loss_mask.numel())
    return model, shape, run, batch


def saved_for_backward(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward pass (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = SupervisedLM(model)(batch, torch.full((int(batch.loss_mask.sum()),), 1e-3))
    loss.backward()
    return sum(kept.values())


@pytest.mark.parametrize("raw", [LLAMA, NEOX], ids=["llama", "gpt_neox"])
@pytest.mark.parametrize("values", SETTINGS, ids=["full", "lora", "lora-dropout", "full-ckpt", "lora-ckpt"])
def test_activations_equal_the_tensors_autograd_keeps(raw, values):
    model, shape, run, batch = build(raw, values)
    predicted = sum(activation_bytes(shape, run).values()) + head_saved_bytes(shape, run)
    assert predicted == saved_for_backward(model, batch)  # exact: every storage is a formula term


@pytest.mark.parametrize("raw", [LLAMA, NEOX, read_model_config("tiny-test")], ids=["llama", "gpt_neox", "tiny-test"])
def test_parameters_and_lora_parameters_are_exact(raw):
    model, shape, run, _ = build(raw, {"peft_type": "lora"})
    base = model.get_base_model()
    assert shape.params == sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    assert trainable_params(shape, run) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.buffer_bytes == sum(b.numel() * b.element_size() for b in base.buffers())


@pytest.mark.parametrize("values", [{}, {"peft_type": "lora"}], ids=["full", "lora"])
def test_adamw_state_after_one_step(values):
    model, shape, run, batch = build(NEOX, values)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-3)
    saved_for_backward(model, batch)
    optimizer.step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert optimizer_bytes(shape, run) == state


def test_tiny_test_numbers():
    """The shipped tiny GPT-NeoX (14.1M parameters, 12.9M of them embeddings and output layer) planned on CPU: pinned figures."""
    shape = read_shape(read_model_config("tiny-test"))
    assert shape.params == 14_067_712
    run = RunSetup("full", 4, 4, rows_per_pass=4, row_tokens=256, supervised_fraction=0.5)
    memory = plan_memory(shape, run)
    assert memory.persistent["weights"] == 4 * 14_067_712 + 32  # + rotary inv_freq and original_inv_freq (4 float32 each)
    assert memory.persistent["optimizer state (AdamW)"] == 8 * 14_067_712 + 4 * 76  # 76 tensors' step counters
    assert run.supervised_tokens == 512  # no data statistics: rows full, half supervised
    assert memory.transient["output layer logits (largest chunk)"] == 512 * 50304 * 4 + 512 * 128 * 4
    assert memory.transient["AdamW step temporaries"] == 2 * 50304 * 128 * 4 + 512 * 128 * 4  # + the MLP's output
    assert memory.peak_moment == "end of a forward pass"


def test_meter_counts_no_alias_of_a_tensor_it_did_not_create():
    """A view or an in-place update of a tensor that was there before (a weight, AdamW's state) is no new storage;
    a view of a new tensor keeps it counted after the tensor itself is gone."""
    old = torch.zeros(1000)
    with TensorBytes(torch.device("cpu")) as meter:
        old.mul_(2).t().add_(1)
        new = torch.ones(1000)
        view = new[:10]
        del new
        assert meter.now == 4000
        del view
    assert meter.now == 0 and meter.peak == 4000


@pytest.mark.parametrize("values", [{}, {"peft_type": "lora"}], ids=["full", "lora"])
def test_adamw_step_temporaries_are_measured_exactly(values):
    """torch's per-tensor AdamW (the CPU default) holds sqrt(exp_avg_sq) and its quotient of one tensor at a time."""
    model, shape, run, batch = build(NEOX, values)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-3)
    saved_for_backward(model, batch)
    optimizer.step()  # the state exists: the next step creates only temporaries
    with TensorBytes(torch.device("cpu")) as meter:
        optimizer.step()
    if run.lora:  # a bound: kilobytes
        assert 2 * 8 * 256 * 4 <= meter.peak <= optimizer_step_bytes(shape, run)
    else:
        assert meter.peak == optimizer_step_bytes(shape, run) == 2 * 512 * 64 * 4 + 256 * 64 * 4


@pytest.mark.parametrize("values", [{}, {"peft_type": "lora"}], ids=["full", "lora"])
def test_output_layer_transients_are_measured(values):
    """Inside the fused output layer's forward: the saved gradients plus the largest chunk's logits and hidden-state
    gradient; at its backward: the saved gradients and their scaled copies (exact to the small per-token tensors)."""
    model, shape, run, batch = build(NEOX, values)
    supervised = int(batch.loss_mask.sum())
    hidden = torch.randn(supervised, shape.hidden, requires_grad=True)
    head = model.get_output_embeddings()
    weight = head.weight
    targets = torch.randint(0, shape.vocab, (supervised,))
    from mftcoder.loss import fused_linear_cross_entropy

    with TensorBytes(torch.device("cpu")) as forward:
        loss, losses = fused_linear_cross_entropy(hidden, weight, None, targets, torch.full((supervised,), 1e-3), 1024)
    kept = forward.now
    with TensorBytes(torch.device("cpu")) as backward:
        loss.backward()
    per_token = supervised * 64  # losses, log-normalizers, targets and other per-token tensors: at most 64 B a token
    assert head_saved_bytes(shape, run) <= kept <= head_saved_bytes(shape, run) + per_token
    expected = head_saved_bytes(shape, run) + head_forward_bytes(shape, run)
    assert expected <= forward.peak <= expected + per_token
    assert head_backward_bytes(shape, run) <= backward.peak <= head_backward_bytes(shape, run) + per_token


@pytest.fixture
def run_cli(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mftcoder", "plan", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    return run


def test_json_keys_carry_their_units(run_cli, small_tasks):
    data = ",".join(small_tasks["data_paths"])
    result = run_cli("/dev/null", "model_config=tiny-test", f"data_paths=[{data}]",
                     f"data_cache_dir={small_tasks['data_cache_dir']}", "seq_length=256", "--json",
                     "--device-memory", "8GB")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("tensor_peak_bytes", "peak_bytes", "overhead_bytes", "device_memory_bytes", "step_time_s",
                "step_flops", "total_time_s", "step_time_terms_s"):
        assert key in out
    assert out["device_memory_bytes"] == 8 * 2**30 and out["fits"] is True
    assert out["peak_bytes"] == out["tensor_peak_bytes"] + out["overhead_bytes"]
    assert out["components_bytes"]["weights"] == 4 * 14_067_712 + 32
    assert out["parameters"] == 14_067_712


def test_unknown_model_type_is_a_sentence(run_cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    result = run_cli("/dev/null", f"model_config={tmp_path / 'config.json'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: model_type 'mamba': plan sizes llama")


def test_70b_full_fine_tuning_does_not_fit_one_80gb_gpu(run_cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    started = time.perf_counter()
    result = run_cli("/dev/null", f"model_config={tmp_path / 'config.json'}", "seq_length=4096", "--device", "cuda",
                     "--device-memory", "80GB", "--json")
    assert time.perf_counter() - started < 10  # no weights, no model built: a second or two of imports
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["parameters"] == 70_553_706_496  # Llama-3-70B's count
    assert out["fits"] is False and out["verdict"].startswith("does not fit")
    assert out["components_bytes"]["weights"] == 4 * 70_553_706_496 + 512  # float32 master weights
    assert out["components_bytes"]["optimizer_state"] == 8 * 70_553_706_496 + 4 * (80 * 9 + 3)
    changes = [a["change"] for a in out["advice"]]
    assert any("checkpoint_activations" in c for c in changes) and any("nf4" in c for c in changes)
    assert out["advice"][-1]["peak_bytes"] < 80 * 2**30  # everything together fits


@pytest.mark.parametrize("mode", ["auto", "dynamic"])
def test_plan_counts_the_steps_the_trainer_runs(small_tasks, mode, tmp_path):
    """With the data cached, plan draws and arranges an epoch with the trainer's own functions: the same steps per
    epoch, data_weights (2.5 = twice plus a random half) and a file-order split included. 'auto' (the default) packs,
    as the trainer does once its start-up check passes."""
    from mftcoder.train.distributed import init_distributed
    from mftcoder.train.loop import Trainer

    task = Path(small_tasks["data_paths"][0]).name
    config, _ = build_config({**small_tasks, "model_config": "tiny-test", "seq_length": 256, "padding_mode": mode,
                              "per_device_train_batch_size": 2, "data_weights": {task: 2.5}, "data_split": "70,30,0",
                              "shuffle_before_split": False, "output_dir": str(tmp_path / "run")})
    trainer = Trainer(config, init_distributed())  # tokenizes: the cache plan reads
    plan = make_plan(config, Target("cpu", 1))
    assert "tokenized cache" in plan.schedule.note
    assert trainer.padding_mode == ("pack" if mode == "auto" else mode)
    assert plan.schedule.steps_per_epoch == trainer.steps_per_epoch == len(trainer._epoch_steps(0))
    rows = [row for step in trainer._epoch_steps(0) for batch in step for row in batch]
    lengths = {t.task.id: t.lengths for t in trainer.data.per_task}
    real = sum(int(lengths[task_id][record]) for row in rows for task_id, record in row)
    assert plan.schedule.row_fill == pytest.approx(real / (len(rows) * trainer.row_capacity))


# --- the step time as a sum of terms -----------------------------------------------------------------------------
RATES = CpuRates(linear_flops=80e9, frozen_linear_flops=70e9, head_logits=0.3e9,
                 attention_flops=40e9, activation_bandwidth=50e9, weight_bandwidth=20e9,
                 op_seconds=2e-6, dequantize_weights=5e9, gloo_gather_bytes=1e9, gloo_scatter_bytes=0.5e9,
                 adapter_flops=10e9)


def tiny_run(**changes) -> tuple:
    """tiny-test's shape and a 4-row x 256-token run (one pass), with `changes` to the run."""
    shape = read_shape(read_model_config("tiny-test"))
    base = dict(rows_per_pass=4, row_tokens=256, micro_batch_rows=4)
    if changes.get("method") in ("lora", "qlora"):
        base["lora_targets"] = lora_layers(shape, "all-linear")
    base.update(changes)
    return shape, RunSetup(base.pop("method", "full"), 4, 4, **base)


def test_time_terms_sum_to_the_step_time_and_carry_units(small_tasks):
    config, _ = build_config({**small_tasks, "model_config": "tiny-test", "seq_length": 256,
                              "per_device_train_batch_size": 4})
    plan = make_plan(config, Target("cpu", 1))
    assert all(key.endswith("_s") for key in plan.time_terms)
    assert {"linears_s", "attention_s", "output_layer_s", "elementwise_s",
            "optimizer_s", "step_overhead_s"} <= set(plan.time_terms)
    assert plan.step_seconds == pytest.approx(sum(plan.time_terms.values()), rel=1e-12)
    assert all(seconds >= 0 for seconds in plan.time_terms.values())


def test_each_time_term_scales_as_its_formula():
    shape, full = tiny_run()
    _, lora = tiny_run(method="lora")
    work = step_work(full, 0.5, 1.0)
    assert work == StepWork(tokens=1024, rows=4, supervised=512, passes=1)
    terms = cpu_step_terms(shape, full, work, RATES)
    # the linears: 2 x 3 x weights x tokens at the measured rate; LoRA's frozen base 2/3 of that work
    weights = 6 * (128 * 384 + 128 * 128 + 2 * 128 * 512)
    assert terms["linears_s"] == pytest.approx(2 * 3 * weights * 1024 / 80e9)
    same_rate = dataclasses.replace(RATES, frozen_linear_flops=RATES.linear_flops)
    assert cpu_step_terms(shape, lora, work, same_rate)["linears_s"] == pytest.approx(2 / 3 * terms["linears_s"])
    assert forward_passes(tiny_run(checkpointing=True)[1]) == 4
    # the output layer and loss: supervised tokens only (logits x the measured rate); twice the tokens, twice the time
    double = cpu_step_terms(shape, full, StepWork(1024, 4, 1024, 1), RATES)
    assert double["output_layer_s"] == pytest.approx(2 * terms["output_layer_s"])
    assert terms["output_layer_s"] == pytest.approx(512 * 50304 / 0.3e9)
    # attention: every row x row pair of each row, forward and backward (3 x 4 n^2 heads head_dim), per layer
    assert terms["attention_s"] == pytest.approx(3 * 4 * 4 * 256 ** 2 * 4 * 32 * 6 / 40e9)
    long_rows = dataclasses.replace(full, row_tokens=512, rows_per_pass=2, micro_batch_rows=2)
    longer = cpu_step_terms(shape, long_rows, step_work(long_rows, 0.5, 1.0), RATES)
    assert longer["attention_s"] == pytest.approx(2 * terms["attention_s"])  # half the rows, each 4x the pairs
    # AdamW: 23 accesses of each trainable byte; LoRA trains far fewer; FSDP steps a shard
    assert terms["optimizer_s"] == pytest.approx(14_067_712 * 4 * 23 / 20e9)
    fsdp = dataclasses.replace(full, engine="fsdp", nproc=2)
    assert cpu_step_terms(shape, fsdp, work, RATES)["optimizer_s"] == pytest.approx(terms["optimizer_s"] / 2)
    # FSDP2 x 2: weights gathered for forward and backward, float32 gradients reduce-scattered, half of each received
    assert cpu_step_terms(shape, fsdp, work, RATES)["communication_s"] == pytest.approx(
        0.5 * (2 * 14_067_712 * 4 / 1e9 + 14_067_712 * 4 / 0.5e9))
    assert terms["communication_s"] == 0.0
    # LoRA's adapters: r (fan_in + fan_out) parameters per wrapped linear, 2 x 3 FLOPs each per token, at their own
    # rate (peft's path with dropout, measured apart: low-rank matmuls run far below a linear's rate)
    adapters = 6 * 8 * ((128 + 384) + (128 + 128) + 2 * (128 + 512))
    assert cpu_step_terms(shape, lora, work, RATES)["lora_adapters_s"] == pytest.approx(2 * 3 * adapters * 1024 / 10e9)
    assert terms["lora_adapters_s"] == 0.0
    # QLoRA: each linear's weights dequantized in forward and backward
    _, qlora = tiny_run(method="qlora", quantization="nf4")
    assert cpu_step_terms(shape, qlora, work, RATES)["dequantization_s"] == pytest.approx(2 * weights / 5e9)
    # twice the passes (max_forward_tokens): twice the operators, the same arithmetic
    split = dataclasses.replace(full, rows_per_pass=2, passes_per_step=2)
    halves = cpu_step_terms(shape, split, step_work(split, 0.5, 1.0), RATES)
    assert halves["linears_s"] == terms["linears_s"]
    assert halves["operator_dispatch_s"] == pytest.approx(2 * terms["operator_dispatch_s"])


def test_cuda_time_is_flops_over_peak_and_mfu():
    shape, run = tiny_run()
    work = step_work(run, 0.5, 1.0)
    (seconds,) = gpu_step_terms(shape, run, work, 989e12, 0.35).values()
    assert seconds == pytest.approx(step_flops(shape, run, work) / (989e12 * 0.35))


def test_cpu_rates_are_measured_once_per_machine_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("MFTCODER_CACHE", str(tmp_path))
    lora = dict(dropout=True, adapters=((32, 64),), lora_rank=4)  # the adapter's rate draws dropout masks
    torch.manual_seed(0)
    stream = torch.get_rng_state()
    started = time.perf_counter()
    first = measure_cpu_rates(64, 32, 64, 2, 16, 256, 32, threads=1, **lora)
    took = time.perf_counter() - started
    assert torch.equal(torch.get_rng_state(), stream)  # a training run's random stream is the same, measured or not
    started = time.perf_counter()
    assert measure_cpu_rates(64, 32, 64, 2, 16, 256, 32, threads=1, **lora) is first  # this process: no second look
    measure_cpu_rates.cache_clear()  # as a later run would: the rates come from the file, not measured again
    assert measure_cpu_rates(64, 32, 64, 2, 16, 256, 32, threads=1, **lora) == first
    assert time.perf_counter() - started < 0.05 < took
    kept = json.loads((tmp_path / "cpu_rates.json").read_text())
    assert len(kept) == 1 and first.linear_flops > 0 and first.head_logits > 0 and first.op_seconds < 1e-3
    measure_cpu_rates(64, 32, 64, 2, 16, 256, 32, threads=2, **lora)  # other threads: measured and kept apart
    assert len(json.loads((tmp_path / "cpu_rates.json").read_text())) == 2
