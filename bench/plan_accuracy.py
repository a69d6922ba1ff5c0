#!/usr/bin/env python
"""How good `mftcoder plan` is: predicted against measured peak of the training tensors and step time, per run.

    python bench/plan_accuracy.py --rows tiny        # the shipped tiny GPT-NeoX rows (a minute or two)
    python bench/plan_accuracy.py --rows all         # also SmolLM2-135M-Instruct rows (full, LoRA, QLoRA; long)

Each row trains --steps optimizer steps with mftcoder's own Trainer (one process, or 2 FSDP2 ranks under torchrun):
the prediction is the one the trainer prints at its start (mftcoder.plan.check); the measured peak is that of every
tensor on the training device during the last step (mftcoder.train.memory_meter.TensorBytes, starting from the live
tensors: weights, optimizer state, batches), and the step time the median of the steps between the first (warm-up)
and the metered one. Rank 0's figures under FSDP2. Prints a markdown table with the ratios measured / predicted.

The plan predicts the pass with the most supervised tokens of an epoch (the output layer's logits chunk grows with
them); the metered step is whichever came last, so the table also gives the formulas evaluated at that step's own
fullest pass ("at the step's S"), which checks the formulas apart from the data statistic. FSDP2 gathers a unit's
parameters into storages it resizes, which no operation creates and the meter cannot see: the bench adds those
storages' bytes (FSDPParam.all_gather_outputs) at each moment to the meter's count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mftcoder.plan.memory import plan_memory  # noqa: E402
from dpo_common import REPO, SMOLLM2, StepClock, tensor_bytes_meter, timed_run  # noqa: E402

DEMO = REPO / "mftcoder" / "assets" / "demo_data"
COMMON = {"data_paths": [str(p) for p in sorted(DEMO.iterdir()) if p.is_dir()], "evaluation_strategy": "no",
          "evaluate_before_training": False, "plot_curves": False, "save_strategy": "steps",
          "checkpointing_steps": 10_000, "overwrite_output_dir": True, "learning_rate": 1e-4}
TINY = {"model_config": "tiny-test", "seq_length": 256, "per_device_train_batch_size": 4}
SMOL = {"pretrained_model_path": str(SMOLLM2), "chat_template": "model", "seq_length": 512,
        "per_device_train_batch_size": 4}
ROWS = {  # name -> (model, overrides, processes)
    "tiny full": ("tiny", {}, 1),
    "tiny full, max_forward_tokens 256": ("tiny", {"max_forward_tokens": 256}, 1),
    "tiny LoRA": ("tiny", {"peft_type": "lora"}, 1),
    "tiny LoRA, checkpointing": ("tiny", {"peft_type": "lora", "checkpoint_activations": True}, 1),
    "tiny full, FSDP2 x 2": ("tiny", {"distributed_strategy": "fsdp"}, 2),
    "SmolLM2 LoRA": ("smollm2", {"peft_type": "lora"}, 1),
    "SmolLM2 LoRA, checkpointing, max_forward_tokens 512": (
        "smollm2", {"peft_type": "lora", "checkpoint_activations": True, "max_forward_tokens": 512}, 1),
    "SmolLM2 full": ("smollm2", {}, 1),
    "SmolLM2 QLoRA nf4": ("smollm2", {"peft_type": "lora", "quantization": "nf4"}, 1),
    "SmolLM2 full, FSDP2 x 2, checkpointing": (
        "smollm2", {"distributed_strategy": "fsdp", "checkpoint_activations": True}, 2),
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


def fullest_pass(batches, forward_tokens: int) -> int:
    """Supervised tokens of the step's fullest forward pass, split as the trainer splits it."""
    return max(int(piece.loss_mask.sum()) for b in batches for piece in b.split_rows(forward_tokens))


def worker(values: dict, steps: int, out: Path) -> None:
    """Train `steps` steps in this process (a torchrun rank or alone) and write its measurement and prediction."""
    from mftcoder.config import build_config
    from mftcoder.train.distributed import init_distributed, shutdown
    from mftcoder.train.loop import Trainer

    env = init_distributed()
    trainer = Trainer(build_config(values)[0], env)
    meter = tensor_bytes_meter()
    if values.get("distributed_strategy") == "fsdp":
        meter = gathered_meter(meter, trainer.runner)
    clock = StepClock(metered_step=steps, meter_class=meter)
    inner, seen = trainer.train_step, []
    trainer.train_step = lambda batches: seen.append(fullest_pass(batches, trainer.forward_tokens)) or inner(batches)
    result, started = timed_run(trainer, clock)
    summary = clock.summary(started)
    plan = trainer.plan_check.plan
    own = plan_memory(plan.shape, dataclasses.replace(plan.run, fullest_pass_supervised=seen[-1]))
    report = {"measured_peak_bytes": summary["meter_peak"], "own_s_peak_bytes": own.peak, "step_s_tokens": seen[-1],
              "plan_s_tokens": plan.run.supervised_tokens, "moment": plan.memory.peak_moment, "measured_step_s": statistics.median(summary["step_s"]),
              "predicted_peak_bytes": plan.memory.peak, "predicted_step_s": plan.step_seconds,
              "largest": plan.memory.largest()[0], "losses": result.step_losses}
    (out / f"rank-{env.rank}.json").write_text(json.dumps(report))
    del trainer
    shutdown(env)


def run_row(name: str, steps: int, folder: Path) -> dict:
    model, overrides, nproc = ROWS[name]
    values = {**COMMON, **(TINY if model == "tiny" else SMOL), **overrides, "max_steps": steps,
              "output_dir": str(folder / "run"), "data_cache_dir": str(folder.parent / "cache")}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}"]
    command = [*launcher, __file__, "--worker", json.dumps(values), "--steps", str(steps), "--out", str(folder)]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return json.loads((folder / "rank-0.json").read_text())


def table(results: dict[str, dict]) -> str:
    lines = ["| run | predicted peak MiB (S) | at the step's S MiB (S) | measured peak MiB | measured / predicted | "
             "measured / at the step's S | peak moment | predicted s/step | measured s/step | measured / predicted | "
             "largest component |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for name, r in results.items():
        m = r["measured_peak_bytes"]
        lines.append(f"| {name} | {r['predicted_peak_bytes'] / 2**20:.1f} ({r['plan_s_tokens']}) | "
                     f"{r['own_s_peak_bytes'] / 2**20:.1f} ({r['step_s_tokens']}) | {m / 2**20:.1f} | "
                     f"{m / r['predicted_peak_bytes']:.2f} | {m / r['own_s_peak_bytes']:.2f} | {r['moment']} | "
                     f"{r['predicted_step_s']:.2f} | "
                     f"{r['measured_step_s']:.2f} | {r['measured_step_s'] / r['predicted_step_s']:.2f} | {r['largest']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", choices=("tiny", "all"), default="tiny")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first warms up, the last "
                        "is metered; the ones between are timed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.steps, Path(args.out))
        return 0
    names = [n for n in ROWS if args.rows == "all" or ROWS[n][0] == "tiny"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for k, name in enumerate(names):
            folder = Path(tmp) / f"row{k}"
            folder.mkdir()
            results[name] = run_row(name, args.steps, folder)
            print(f"{name}: done", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
