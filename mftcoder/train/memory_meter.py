"""Bytes of tensors on one device over time, counted from the operations themselves (a TorchDispatchMode), so it
works on CPU too, where no allocator keeps statistics: what benchmarks and tests measure memory with."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorBytes(TorchDispatchMode):
    """`start` bytes (what was on the device already) plus every storage an operation creates or returns on `device`
    while a tensor on it lives; `.peak` is the most at once. On CPU the training device is the host, so a host tensor
    an operation hands on (one being broadcast) counts as in transit, as its copy on a GPU would. An operation that
    returns an alias of its input (a view, an in-place update: the optimizer's on the weights and its state) creates
    no storage: it keeps a storage counted here alive, or one that was there before (in `start`) and adds nothing."""

    def __init__(self, device: torch.device, start: int = 0):
        super().__init__()
        self.device, self.now, self.peak = torch.device(device), start, start
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tracked tensors on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device == self.device and not tensor.is_meta:
                self._track(tensor, aliases)
        return out

    def _track(self, tensor: torch.Tensor, alias: bool = False) -> None:
        try:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
        except RuntimeError:  # a wrapper subclass (DTensor) has no storage of its own: its local tensor is tracked
            return
        if key == 0 or (alias and key not in self.live):  # no storage, or one there before the meter started
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]
