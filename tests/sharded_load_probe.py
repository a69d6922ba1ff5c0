"""Run by tests/test_distributed.py under torchrun: trains with the config given as JSON (argv[1]) and writes, per rank,
to argv[2]/rank-N.json what the model that trains held before sharding (real bytes, all meta?), whether anything stayed
on the meta device afterwards, the bytes of this rank's shards, the peak bytes on the training device while sharding
(the model's own tensors there, plus every tensor created meanwhile while it lives), and the step losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import mftcoder.train.loop as loop
import mftcoder.train.model_setup as model_setup
from mftcoder.config import build_config
from mftcoder.train.distributed import init_distributed, shutdown
from mftcoder.train.memory_meter import TensorBytes


def real_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters that hold memory on this rank (a sharded parameter: its local shard)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += 0 if local.is_meta else local.numel() * local.element_size()
    return total


def main() -> None:
    values, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    report: dict = {}
    load = model_setup.load_base_model

    def load_and_record(*args, **kwargs):
        model = load(*args, **kwargs)
        report.setdefault("built", []).append([all(p.is_meta for p in model.parameters()), real_bytes(model)])
        return model

    prepare = model_setup.RankZeroLoad.prepare

    def prepare_and_measure(self, parallel, runner, model, optimizer):
        with TensorBytes(env.device, real_bytes(runner)) as device:
            prepared = prepare(self, parallel, runner, model, optimizer)
        report["device_peak_bytes"] = device.peak
        return prepared

    model_setup.load_base_model = load_and_record  # the trainer's own loading, observed
    model_setup.RankZeroLoad.prepare = prepare_and_measure
    trainer = loop.Trainer(build_config(values)[0], env)
    tensors = [*trainer.model.named_parameters(), *trainer.model.named_buffers()]
    report["meta_after"] = [name for name, tensor in tensors if tensor.is_meta]
    report["shard_bytes"] = real_bytes(trainer.model)
    report["losses"] = trainer.run().step_losses
    (out / f"rank-{env.rank}.json").write_text(json.dumps(report))
    del trainer
    shutdown(env)


if __name__ == "__main__":
    main()
