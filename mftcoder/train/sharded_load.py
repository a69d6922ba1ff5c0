"""Low-memory start-up under FSDP2: rank 0 reads (or initialises) the weights and every other rank builds an empty
twin on the meta device. As each FSDP unit (a decoder layer, then the root) is sharded, its weights go from rank 0
to every rank's shards, and rank 0 lets go of that unit's full tensors. At start-up host memory then holds one
full copy (rank 0's, shrinking unit by unit) plus the shards, instead of one full copy per rank."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mftcoder.families import build_runner
from mftcoder.loss import SupervisedLM
from mftcoder.train.distributed import DistEnv, OptimizerSpec, Parallelism


class RankZeroLoad:
    """The start-up steps that differ when only rank 0 holds real weights (FSDP over several ranks). With one
    process or DDP (`active` False) each step is what it always was: every rank loads and checks its own model."""

    def __init__(self, env: DistEnv, sharded: bool):
        self.env = env
        self.active = sharded and env.distributed

    @property
    def empty(self) -> bool:
        """Whether this rank builds the model on the meta device (no weights read) and receives its shards."""
        return self.active and not self.env.is_main

    def build_runner(self, model: torch.nn.Module, padding_mode: str, per_task, pad_id: int,
                     say=None) -> tuple[SupervisedLM, str]:
        """The runner and batch layout (families.build_runner). Its start-up checks run the model, so they need real
        weights: rank 0 runs them and the other ranks take its decisions (the ones a full copy would give)."""
        if not self.active:
            return build_runner(model, padding_mode, per_task, pad_id, self.env.device, say)
        decision: list = [None]
        if self.env.is_main:
            runner, layout = build_runner(model, padding_mode, per_task, pad_id, self.env.device, say)
            decision = [(runner.fused_head, layout)]
        dist.broadcast_object_list(decision, src=0)
        fused_head, layout = decision[0]
        return (runner if self.env.is_main else SupervisedLM(model, fused_head=fused_head)), layout

    def prepare(self, parallel: Parallelism, runner: torch.nn.Module, model: torch.nn.Module,
                optimizer: OptimizerSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """parallel.prepare(...), each unit's shards filled from rank 0 as it is sharded; then the buffers and rank
        0's RNG state (building the real model advanced it; dropout then matches a full load)."""
        if not self.active:
            return parallel.prepare(runner, model, optimizer)
        prepared = parallel.prepare(runner, model, optimizer, around_shard=self.shard_and_fill)
        broadcast_buffers(model, self.env.device)
        rng = [torch.get_rng_state() if self.env.is_main else None]
        dist.broadcast_object_list(rng, src=0)
        torch.set_rng_state(rng[0])
        return prepared

    def shard_and_fill(self, unit: torch.nn.Module, shard: Callable[[torch.nn.Module], None]) -> None:
        """Shard one FSDP unit, then give every rank its shards of the unit's own parameters (those no inner unit
        took) from rank 0's full tensors, one module at a time; rank 0 drops each full tensor once it is sent."""
        own = own_parameters(unit)
        full = {name: unit.get_parameter(name).detach() for name in own} if self.env.is_main else {}
        shard(unit)
        for owner, names in owners(list(own)).items():
            state = {name.rpartition(".")[2]: full.pop(name) for name in names} if self.env.is_main else {}
            fill_module(unit.get_submodule(owner), state)
        for name, aliases in own.items():  # a tied parameter (embeddings and output layer) stays one parameter
            for alias in aliases:
                owner, _, leaf = alias.rpartition(".")
                setattr(unit.get_submodule(owner), leaf, unit.get_parameter(name))


def own_parameters(unit: torch.nn.Module) -> dict[str, list[str]]:
    """The parameters of a unit that no inner FSDP unit took (not yet DTensors): first name -> its other names."""
    first: dict[int, str] = {}
    own: dict[str, list[str]] = {}
    for name, param in unit.named_parameters(remove_duplicate=False):
        if isinstance(param, DTensor):
            continue
        if id(param) in first:
            own[first[id(param)]].append(name)
        else:
            first[id(param)] = name
            own[name] = []
    return own


def owners(names: list[str]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that holds them ('' for the unit itself)."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(name.rpartition(".")[0], []).append(name)
    return grouped


def fill_module(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """One module's sharded parameters from rank 0's full tensors (`state`; {} on the other ranks). On an empty
    rank the meta shards are replaced by real ones (load_state_dict assign, which FSDP2 follows)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    with warnings.catch_warnings():  # an empty rank has no real tensor to take the device from, so torch asks the
        warnings.filterwarnings("ignore", message=".*(_get_pg_default_device|Multiple backends are registered)")
        set_model_state_dict(module, state, options=options)  # process group (cpu: gloo, cuda: nccl) and says so


def broadcast_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Every buffer from rank 0, which has them all; an empty rank's meta buffers (rotary inv_freq: not in the
    state dict) are allocated first. The ranks check first that they built the same buffers."""
    buffers = list(model.named_buffers())
    layout = [(name, tuple(b.shape), str(b.dtype)) for name, b in buffers]
    theirs = [layout]
    dist.broadcast_object_list(theirs, src=0)
    if theirs[0] != layout:
        raise RuntimeError(f"rank {dist.get_rank()} built other buffers than rank 0: {layout} vs {theirs[0]}")
    for name, buffer in buffers:
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            buffer = torch.empty_like(buffer, device=device)
            setattr(model.get_submodule(owner), leaf, buffer)
        dist.broadcast(buffer, src=0)
