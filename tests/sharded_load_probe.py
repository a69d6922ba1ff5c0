"""Run by tests/test_distributed.py under torchrun: trains with the config given as JSON (argv[1]) and writes, per rank,
to argv[2]/rank-N.json what the model that trains held before sharding (real bytes, all meta?), whether anything stayed
on the meta device afterwards, the bytes of this rank's shards, the peak bytes on the training device while sharding
(the model's own tensors there, plus every tensor created meanwhile while it lives), and the step losses."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mftcoder.train.loop as loop
from mftcoder.config import build_config
from mftcoder.train.distributed import init_distributed, shutdown


def real_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters that hold memory on this rank (a sharded parameter: its local shard)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += 0 if local.is_meta else local.numel() * local.element_size()
    return total


class DeviceBytes(TorchDispatchMode):
    """Bytes on `device` over time: `start` (what was there already) plus every storage an operation creates or
    returns while a tensor on it lives. On CPU the training device is the host, so a host tensor an operation hands
    on (rank 0's full tensor being broadcast) counts as one in transit, as its copy on a GPU would."""

    def __init__(self, device: torch.device, start: int):
        super().__init__()
        self.device, self.now, self.peak, self.live = device, start, start, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device == self.device and not tensor.is_meta:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
        except RuntimeError:  # a wrapper subclass (DTensor) has no storage of its own: its local tensor is tracked
            return
        if key == 0:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def main() -> None:
    values, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    report: dict = {}
    load = loop.load_base_model

    def load_and_record(*args, **kwargs):
        model = load(*args, **kwargs)
        report.setdefault("built", []).append([all(p.is_meta for p in model.parameters()), real_bytes(model)])
        return model

    prepare = loop.RankZeroLoad.prepare

    def prepare_and_measure(self, parallel, runner, model, optimizer):
        with DeviceBytes(env.device, real_bytes(runner)) as device:
            prepared = prepare(self, parallel, runner, model, optimizer)
        report["device_peak_bytes"] = device.peak
        return prepared

    loop.load_base_model = load_and_record  # the trainer's own loading, observed
    loop.RankZeroLoad.prepare = prepare_and_measure
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
