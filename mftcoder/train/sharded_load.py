"""Start-up under FSDP2: the model that trains is an empty twin (the meta device) on every rank, rank 0 included; rank 0
alone reads (or initialises) the weights, into a copy on the host (CPU). As each FSDP unit (a decoder layer, then the
root) is sharded, its weights go from that copy to every rank's shards on the training device, one tensor at a time,
and rank 0 lets go of the unit's host tensors. So the training device never holds more than the shards plus one tensor
in transit (the largest model that trains is what the shards hold, not what one GPU holds), and host memory one full
copy (rank 0's, shrinking unit by unit) instead of one per rank."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mftcoder.loss import SupervisedLM
from mftcoder.train.distributed import DistEnv, OptimizerSpec, Parallelism


class RankZeroLoad:
    """The start-up steps that differ when only rank 0 holds real weights (FSDP, any number of processes). Without
    sharding (`active` False) each step is what it always was: every rank builds its own model."""

    def __init__(self, env: DistEnv, sharded: bool):
        self.env = env
        self.active = sharded
        self.source: torch.nn.Module | None = None  # rank 0's host copy with the real weights, until sharded

    def build(self, make: Callable[[bool], torch.nn.Module]) -> torch.nn.Module:
        """The model that trains, from make(empty): a real one where nothing is sharded; under FSDP an empty twin on
        every rank, rank 0 also keeping make(False) on the host. The twin is built with the RNG set aside (initialising
        LoRA on the meta device still draws from it), so rank 0's real build draws what one process would."""
        if not self.active:
            return make(False)
        with torch.random.fork_rng(devices=[]):
            model = make(True)
        if self.env.is_main:
            self.source = make(False)
        return model

    def prepare(self, parallel: Parallelism, runner: torch.nn.Module, model: torch.nn.Module,
                optimizer: OptimizerSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """parallel.prepare(...), each unit's shards filled from rank 0's host copy as it is sharded; then the buffers
        and rank 0's RNG state (building the real model advanced it; dropout then matches a full load)."""
        if not self.active:
            return parallel.prepare(runner, model, optimizer)
        source = SupervisedLM(self.source) if self.env.is_main else None  # the runner's own qualified names
        paths = {id(module): name for name, module in runner.named_modules()}
        prepared = parallel.prepare(runner, model, optimizer, around_shard=lambda unit, shard: self.shard_and_fill(
            unit, shard, source.get_submodule(paths[id(unit)]) if source is not None else None))
        broadcast_buffers(runner, source, self.env.device)
        rng = [torch.get_rng_state() if self.env.is_main else None]
        dist.broadcast_object_list(rng, src=0)
        torch.set_rng_state(rng[0])
        self.source = None  # every weight is on the device now
        return prepared

    def shard_and_fill(self, unit: torch.nn.Module, shard: Callable[[torch.nn.Module], None],
                       source: torch.nn.Module | None) -> None:
        """Shard one FSDP unit (still empty), then give every rank its shards of the unit's own parameters (those no
        inner unit took) from rank 0's host tensors (`source`, the same unit there), one module at a time; rank 0
        drops each host tensor once it is sent."""
        own = own_parameters(unit)
        full = {name: source.get_parameter(name).detach() for name in own} if source is not None else {}
        shard(unit)
        for owner, names in owners(list(own)).items():
            state = {name.rpartition(".")[2]: full.pop(name) for name in names} if source is not None else {}
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
    """One module's sharded parameters from rank 0's full host tensors (`state`; {} on the other ranks): each goes to
    the device, is broadcast, and every rank keeps its shard; the empty (meta) shards are replaced by real ones
    (load_state_dict assign, which FSDP2 follows)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    with warnings.catch_warnings():  # an empty module has no real tensor to take the device from, so torch asks the
        warnings.filterwarnings("ignore", message=".*(_get_pg_default_device|Multiple backends are registered)")
        set_model_state_dict(module, state, options=options)  # process group (cpu: gloo, cuda: nccl) and says so


def broadcast_buffers(runner: torch.nn.Module, source: torch.nn.Module | None, device: torch.device) -> None:
    """Every buffer from rank 0's host copy (`source`; None elsewhere), which has them all: the empty ones (rotary
    inv_freq: not in the state dict) are allocated on the device first. The ranks check first that they built the
    same buffers."""
    buffers = list(runner.named_buffers())
    layout = [(name, tuple(b.shape), str(b.dtype)) for name, b in buffers]
    theirs = [layout]
    dist.broadcast_object_list(theirs, src=0)
    if theirs[0] != layout:
        raise RuntimeError(f"rank {dist.get_rank()} built other buffers than rank 0: {layout} vs {theirs[0]}")
    for name, buffer in buffers:
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            buffer = torch.empty_like(buffer, device=device)
            setattr(runner.get_submodule(owner), leaf, buffer)
        if source is not None:
            buffer.copy_(source.get_buffer(name))
        dist.broadcast(buffer, src=0)
