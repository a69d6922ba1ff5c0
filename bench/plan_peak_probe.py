#!/usr/bin/env python
"""What the training tensors are at the measured peak of one step: TensorBytes extended to remember, for every live
storage, the operation that created it, its shape and dtype and a short stack; at the peak it lists them grouped.

    python bench/plan_peak_probe.py 'tiny LoRA'          # a row name of bench/plan_accuracy.py
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_common import REPO, StepClock, tensor_bytes_meter, timed_run  # noqa: E402
from plan_accuracy import COMMON, ROWS, SMOL, TINY  # noqa: E402

KEEP = ("mftcoder/", "transformers/models", "torch/optim", "torch/nn/utils", "torch/distributed/fsdp", "peft/")


def short_stack() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if any(k in f.filename for k in KEEP)]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-4:]))


def recording_meter(base):
    """base (TensorBytes) that also remembers what each live storage is and snapshots them at every new peak."""

    class Recording(base):
        def __init__(self, device, start=0, start_keys=()):
            super().__init__(device, start)
            self.meta: dict[int, tuple] = {}
            self.func = ""
            self.at_peak: list[tuple] = []
            self.start_keys = set(start_keys)
            self.peak_func = ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.func = str(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track(self, tensor, alias=False):
            try:
                key = tensor.untyped_storage().data_ptr()
            except RuntimeError:
                return
            new = key not in self.live and key != 0
            before = self.peak
            super()._track(tensor, alias)
            if new:
                self.meta[key] = (self.func, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                                  short_stack(), key in self.start_keys)
            if self.peak > before:
                self.at_peak = [(k, v[0], self.meta.get(k)) for k, v in self.live.items()]
                self.peak_func = self.func + " @ " + short_stack()

    return Recording


def live_storages() -> dict[int, tuple[int, str]]:
    """Every CPU storage Python reaches now -> (bytes, what: parameter / grad / other)."""
    import torch

    out = {}
    params = set()
    gc.collect()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.nn.Parameter):
                params.add(obj.untyped_storage().data_ptr())
        except Exception:
            continue
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                s = obj.untyped_storage()
                if s.data_ptr():
                    kind = "parameter" if s.data_ptr() in params else f"other {tuple(obj.shape)} {obj.dtype}"
                    out.setdefault(s.data_ptr(), (s.nbytes(), kind))
                if obj.grad is not None:
                    out.setdefault(obj.grad.untyped_storage().data_ptr(), (obj.grad.untyped_storage().nbytes(), "grad"))
        except Exception:
            continue
    return out


def worker(values: dict, steps: int, out: Path) -> None:
    from mftcoder.config import build_config
    from mftcoder.train.distributed import init_distributed, shutdown
    from mftcoder.train.loop import Trainer

    env = init_distributed()
    trainer = Trainer(build_config(values)[0], env)
    meter_class = recording_meter(tensor_bytes_meter())

    class Clock(StepClock):
        def begin(self, step):
            if step == self.metered_step:
                import torch
                self.start_map = live_storages()
                self.meter_start = sum(b for b, _ in self.start_map.values())
                self.meter = meter_class(torch.device("cpu"), self.meter_start, self.start_map.keys())
                self.meter.__enter__()

    clock = Clock(metered_step=steps)
    timed_run(trainer, clock)
    m, plan = clock.meter, trainer.plan_check.plan
    start_kinds = collections.Counter()
    for b, kind in clock.start_map.values():
        start_kinds[kind if kind in ("parameter", "grad") else kind] += b
    groups = collections.defaultdict(lambda: [0, 0])
    recounted = 0
    for key, nbytes, meta in m.at_peak:
        func, shape, dtype, stack, from_start = meta or ("?", (), "?", "", False)
        if from_start:
            recounted += nbytes
        groups[(func, shape, dtype, stack, from_start)][0] += nbytes
        groups[(func, shape, dtype, stack, from_start)][1] += 1
    report = {"start": clock.meter_start, "peak": m.peak, "peak_at": m.peak_func, "recounted_start": recounted,
              "start_kinds": dict(start_kinds.most_common(30)),
              "at_peak": sorted(([n, c, *k] for k, (n, c) in groups.items()), reverse=True),
              "predicted": plan.memory.peak, "moment": plan.memory.peak_moment,
              "components": plan.memory.components()}
    (out / f"probe-{env.rank}.json").write_text(json.dumps(report, indent=1))
    del trainer
    shutdown(env)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("row")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.steps, Path(args.out))
        return 0
    model, overrides, nproc = ROWS[args.row]
    folder = Path(tempfile.mkdtemp(prefix="plan-probe-"))
    values = {**COMMON, **(TINY if model == "tiny" else SMOL), **overrides, "max_steps": args.steps,
              "output_dir": str(folder / "run"), "data_cache_dir": "/tmp/probe/cache"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}"]
    subprocess.run([*launcher, __file__, args.row, "--worker", json.dumps(values), "--steps", str(args.steps),
                    "--out", str(folder)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL)
    print(folder / "probe-0.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
