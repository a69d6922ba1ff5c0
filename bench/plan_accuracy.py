#!/usr/bin/env python
"""How good `mftcoder plan` is: predicted against measured peak of the training tensors and step time, per run.

    python bench/plan_accuracy.py --rows tiny        # the shipped tiny GPT-NeoX rows (a few minutes)
    python bench/plan_accuracy.py --rows smollm2     # SmolLM2-135M-Instruct rows (full, LoRA, QLoRA; long)
    python bench/plan_accuracy.py --rows all --details   # both, and each row's time terms, steps and rates

Each row trains 1 + --steps + --metered-steps optimizer steps with mftcoder's own Trainer (one process, or 2 FSDP2
ranks under torchrun); the prediction is the one the trainer makes at its start (mftcoder.plan.check). The first step
warms up; the next --steps are timed (the median is the measured step time, rank 0's: ranks step in lockstep); the
last --metered-steps run under the meter of every tensor on the training device (mftcoder.train.memory_meter.
TensorBytes, starting from the live tensors: weights, optimizer state, batches), on every rank. The measured peak is
the largest over ranks and metered steps; the plan predicts the run's fullest pass (the most supervised tokens, on
which the output layer's logits chunk grows), so with few steps the measured peak can fall below it. FSDP2 gathers a
unit's parameters into storages it resizes, which no operation creates and the meter cannot see: the bench adds
those storages' bytes (FSDPParam.all_gather_outputs) at each moment to the meter's count. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_common import REPO, SMOLLM2, live_tensor_bytes, tensor_bytes_meter, timed_run  # noqa: E402

DEMO = REPO / "mftcoder" / "assets" / "demo_data"
COMMON = {"data_paths": [str(p) for p in sorted(DEMO.iterdir()) if p.is_dir()], "evaluation_strategy": "no",
          "evaluate_before_training": False, "plot_curves": False, "save_strategy": "steps",
          "checkpointing_steps": 10_000, "overwrite_output_dir": True, "learning_rate": 1e-4}
TINY = {"model_config": "tiny-test", "seq_length": 256, "per_device_train_batch_size": 4}
SMOL = {"pretrained_model_path": str(SMOLLM2), "chat_template": "model", "seq_length": 512,
        "per_device_train_batch_size": 4}
ROWS = {  # name -> (model, overrides, processes[, threads per process: OMP_NUM_THREADS, else torch's default])
    "tiny full": ("tiny", {}, 1),
    "tiny full, max_forward_tokens 256": ("tiny", {"max_forward_tokens": 256}, 1),
    "tiny LoRA": ("tiny", {"peft_type": "lora"}, 1),
    "tiny LoRA, checkpointing": ("tiny", {"peft_type": "lora", "checkpoint_activations": True}, 1),
    "tiny full, FSDP2 x 2": ("tiny", {"distributed_strategy": "fsdp"}, 2),
    "tiny LoRA r32, rows of 512 x 2, 1 thread": (
        "tiny", {"peft_type": "lora", "lora_rank": 32, "seq_length": 512, "per_device_train_batch_size": 2}, 1, 1),
    "SmolLM2 LoRA": ("smollm2", {"peft_type": "lora"}, 1),
    "SmolLM2 LoRA, checkpointing, max_forward_tokens 512": (
        "smollm2", {"peft_type": "lora", "checkpoint_activations": True, "max_forward_tokens": 512}, 1),
    "SmolLM2 full": ("smollm2", {}, 1),
    "SmolLM2 QLoRA nf4": ("smollm2", {"peft_type": "lora", "quantization": "nf4"}, 1),
    "SmolLM2 full, FSDP2 x 2, checkpointing": (
        "smollm2", {"distributed_strategy": "fsdp", "checkpoint_activations": True}, 2),
    "SmolLM2 LoRA r16 no dropout, rows of 1024 x 2": (
        "smollm2", {"peft_type": "lora", "lora_rank": 16, "lora_dropout": 0.0, "seq_length": 1024,
                    "per_device_train_batch_size": 2}, 1),
    "SmolLM2 LoRA, 1 thread": ("smollm2", {"peft_type": "lora"}, 1, 1),
    "SmolLM2 LoRA, no dropout": ("smollm2", {"peft_type": "lora", "lora_dropout": 0.0}, 1),
    "SmolLM2 full, max_forward_tokens 512, 1 thread": ("smollm2", {"max_forward_tokens": 512}, 1, 1),
}


def gathered_meter(base, runner):
    """base (TensorBytes) plus the bytes of FSDP2's all-gathered parameter storages at every operation."""
    from torch.distributed.fsdp import FSDPModule

    params = [fp for m in runner.modules() if isinstance(m, FSDPModule)
              for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None for fp in group.fsdp_params]

    class Gathered(base):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            gathered = sum(t.untyped_storage().nbytes() for fp in params for t in fp.all_gather_outputs)
            self.peak = max(self.peak, self.now + gathered)
            return out

    return Gathered


class StepMeter:
    """Per optimizer step: the wall-clock stamp at its end; the steps after `timed` + 1 run under the meter (metering
    slows a step down, so the timed ones run before, unmetered)."""

    def __init__(self, timed: int, meter_class):
        self.timed, self.meter_class = timed, meter_class
        self.stamps: list[float] = []
        self.peaks: list[int] = []
        self.meter = None

    def begin(self, step: int) -> None:
        """Start the meter at a metered step, from the live tensors' bytes."""
        if step > self.timed + 1:
            self.meter = self.meter_class(torch_cpu(), live_tensor_bytes())
            self.meter.__enter__()

    def end(self, step: int) -> None:
        """Stop the meter (keeping its peak) or stamp the time."""
        if self.meter is not None:
            self.meter.__exit__(None, None, None)
            self.peaks.append(self.meter.peak)
            self.meter = None
        else:
            self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Durations of the timed steps (each from the end of the one before; the first, warm-up, step excluded)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def torch_cpu():
    import torch

    return torch.device("cpu")


def fullest_pass(batches, forward_tokens: int) -> int:
    """Supervised tokens of the step's fullest forward pass, split as the trainer splits it."""
    return max(int(piece.loss_mask.sum()) for b in batches for piece in b.split_rows(forward_tokens))


def worker(values: dict, timed: int, metered: int, out: Path) -> None:
    """Train 1 + timed + metered steps in this process (a torchrun rank or alone); write its measurements and the
    plan the trainer made at its start."""
    from mftcoder.config import build_config
    from mftcoder.train.distributed import init_distributed, shutdown
    from mftcoder.train.loop import Trainer

    env = init_distributed()
    trainer = Trainer(build_config({**values, "max_steps": 1 + timed + metered})[0], env)
    meter = tensor_bytes_meter()
    if values.get("distributed_strategy") == "fsdp":
        meter = gathered_meter(meter, trainer.runner)
    clock = StepMeter(timed, meter)
    inner, seen = trainer.train_step, []
    trainer.train_step = lambda batches: seen.append(fullest_pass(batches, trainer.forward_tokens)) or inner(batches)
    timed_run(trainer, clock)
    plan = trainer.plan_check.plan
    report = {"measured_peaks_bytes": clock.peaks, "step_s": clock.step_seconds(), "step_s_tokens": seen,
              "plan_s_tokens": plan.run.supervised_tokens, "moment": plan.memory.peak_moment,
              "predicted_peak_bytes": plan.memory.peak, "predicted_step_s": plan.step_seconds,
              "predicted_terms_s": plan.time_terms, "rates": plan.rate_source}
    (out / f"rank-{env.rank}.json").write_text(json.dumps(report))
    del trainer
    shutdown(env)


def run_row(name: str, timed: int, metered: int, folder: Path) -> dict:
    """Run one row; the largest peak over its ranks and metered steps, rank 0's median timed step."""
    model, overrides, nproc, *threads = ROWS[name]
    values = {**COMMON, **(TINY if model == "tiny" else SMOL), **overrides,
              "output_dir": str(folder / "run"), "data_cache_dir": str(folder.parent / "cache")}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}"]
    command = [*launcher, __file__, "--worker", json.dumps(values), "--steps", str(timed), "--metered-steps",
               str(metered), "--out", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"OMP_NUM_THREADS": str(threads[0])} if threads else {})}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(nproc)]
    out = dict(ranks[0])
    out["measured_peak_bytes"] = max(p for r in ranks for p in r["measured_peaks_bytes"])
    out["measured_step_s"] = statistics.median(ranks[0]["step_s"])
    return out


def table(results: dict[str, dict]) -> str:
    """One markdown table: predicted and measured peak of the training tensors and step time, with their ratios."""
    lines = ["| run | predicted MiB | measured MiB | measured / predicted | predicted s | measured s | "
             "measured / predicted |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        m, p = r["measured_peak_bytes"], r["predicted_peak_bytes"]
        lines.append(f"| {name} | {p / 2**20:.1f} | {m / 2**20:.1f} | {m / p:.2f} | {r['predicted_step_s']:.3f} | "
                     f"{r['measured_step_s']:.3f} | {r['measured_step_s'] / r['predicted_step_s']:.2f} |")
    return "\n".join(lines)


def details(results: dict[str, dict]) -> str:
    """Per row: the predicted time terms, the timed steps, the supervised tokens and the rates (for calibration)."""
    out = []
    for name, r in results.items():
        terms = ", ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in r["predicted_terms_s"].items() if v)
        out.append(f"{name}: steps {[round(s, 3) for s in r['step_s']]} s; terms: {terms}; S per step "
                   f"{r['step_s_tokens']} (plan's fullest {r['plan_s_tokens']}); {r['rates']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", choices=("tiny", "smollm2", "all"), default="tiny")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run, after one warm-up step")
    parser.add_argument("--metered-steps", type=int, default=3, help="steps metered for the peak, after the timed ones")
    parser.add_argument("--match", default="", help="only the rows whose name contains this text")
    parser.add_argument("--details", action="store_true", help="also each row's time terms, steps and rates")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.steps, args.metered_steps, Path(args.out))
        return 0
    names = [n for n in ROWS if args.rows in ("all", ROWS[n][0]) and args.match in n]
    results = {}
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for k, name in enumerate(names):
            folder = Path(tmp) / f"row{k}"
            folder.mkdir()
            results[name] = run_row(name, args.steps, args.metered_steps, folder)
            print(f"{name}: done", file=sys.stderr)
    print(table(results))
    if args.details:
        print(details(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
