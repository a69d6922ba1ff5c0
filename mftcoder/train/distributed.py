"""torch.distributed glue: who am I, which device, sums across ranks, and wrapping for data parallelism."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mftcoder.config import Config, ConfigError
from mftcoder.model import parameter_groups


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (a no-op on one process); returns it on its original device."""
        if not self.distributed:
            return tensor
        original = tensor.device
        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(original)

    def all_reduce_max(self, value: float) -> float:
        """The largest value over ranks (what every rank then decides on)."""
        if not self.distributed:
            return value
        work = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return float(work[0])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def lockstep(self, passes: list) -> tuple[list, int]:
        """Every rank runs as many forward passes (under FSDP each is a collective; DDP syncs buffers in each): this
        rank's passes (Batch) padded with loss-free one-token stand-ins to the most any rank has, and the number of
        passes with real tokens on all ranks."""
        real = sum(1 for batch in passes if batch.num_tokens)
        if not self.distributed:
            return passes, real
        counts = torch.zeros(2, self.world_size, dtype=torch.long)
        counts[:, self.rank] = torch.tensor([len(passes), real])
        counts = self.all_reduce_sum(counts)
        return passes + [passes[0].stand_in()] * (int(counts[0].max()) - len(passes)), int(counts[1].sum())


def init_distributed() -> DistEnv:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU), or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(dist.get_rank(), world_size, local_rank, device)


def ensure_process_group(env: DistEnv) -> None:
    """A process group of one where an engine needs one and no launcher made it (FSDP2, ATorch): on a HashStore, with
    the backend of the device (NCCL on a GPU, gloo on CPU); shutdown() ends it."""
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                **({"device_id": env.device} if env.device.type == "cuda" else {}))


def shutdown(env: DistEnv) -> None:
    """Leave the process group cleanly (a barrier first avoids an abort at exit seen under gloo)."""
    if dist.is_initialized():  # also a group of one that an engine started (ATorch needs one)
        env.barrier()
        dist.destroy_process_group()


class Parallelism:
    """The engine interface, and the plain case: one process, no wrapping. An engine wraps the runner and builds the
    optimizer (`prepare`), syncs gradients, clips them, and gathers model and optimizer state for checkpoints."""

    sharded = False  # whether each rank holds only a shard of the weights (saving then gathers them)

    def __init__(self, env: DistEnv, bf16: bool = False):
        self.env = env
        self.bf16 = bf16

    def prepare(self, runner: torch.nn.Module, model: torch.nn.Module, optimizer: OptimizerSpec,
                around_shard: Callable[[torch.nn.Module, Callable], None] | None = None
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The runner as trained (wrapped for this engine) and its optimizer. `around_shard` (FSDP), if given, is
        called as around_shard(unit, shard) for each unit sharded and must call shard(unit)."""
        return self.wrap(runner, model, around_shard), optimizer.build(model)

    def wrap(self, runner: torch.nn.Module, model: torch.nn.Module,
             around_shard: Callable[[torch.nn.Module, Callable], None] | None = None) -> torch.nn.Module:
        return runner

    def loss(self, batch, output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss to backpropagate from the runner's (loss, token losses)."""
        return output[0]

    def gradient_sync(self, runner: torch.nn.Module, sync: bool):
        """A context for one micro-batch's backward: gradients are reduced across ranks only when `sync`."""
        if hasattr(runner, "no_sync") and not sync:
            return runner.no_sync()
        if hasattr(runner, "set_requires_gradient_sync"):
            runner.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_gradients(self, runner: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Clip the gradients to max_norm (inf: measure only); returns their total norm before clipping."""
        return clip_gradients(optimizer, max_norm)

    def full_model_state(self, runner: torch.nn.Module) -> dict | None:
        """Sharded: the full (gathered, CPU) state dict of the user's model on the main process (a collective; the
        others get {}). Otherwise None: the model saves its own state."""
        return gathered_model_state(runner) if self.sharded else None

    def save_optimizer(self, runner: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Sharded: every rank writes its shard (torch.distributed.checkpoint); else the main process saves."""
        if self.sharded:
            save_sharded_optimizer(runner, optimizer, directory)
        elif self.env.is_main:
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_optimizer(self, runner: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        sharded_copy = (directory / "optimizer").is_dir()
        if self.sharded != sharded_copy:
            raise ConfigError(f"distributed_strategy: {directory} holds optimizer state saved "
                              f"{'with' if sharded_copy else 'without'} sharding (FSDP); resume with a "
                              f"{'sharded' if sharded_copy else 'replicated'} strategy")
        if self.sharded:
            load_sharded_optimizer(runner, optimizer, directory)
        else:
            optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True,
                                                 map_location=self.env.device))


class DataParallel(Parallelism):
    """DDP: a replica per rank, gradients averaged in backward."""

    def wrap(self, runner, model, around_shard=None):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(runner, device_ids=device_ids)


class FullyShard(Parallelism):
    """FSDP2: each decoder layer sharded on its own, then the root; optimizer state saved per rank. With one process it
    shards over a group of one, so the numerics (the bf16 mixed-precision policy) and the checkpoint format are those of
    N processes."""

    sharded = True

    def __init__(self, env: DistEnv, bf16: bool = False, reduce_every_pass: bool = True):
        super().__init__(env, bf16)
        self.reduce_every_pass = reduce_every_pass
        ensure_process_group(env)

    def gradient_sync(self, runner, sync):
        """Gradients reduce-scattered after every pass (each rank keeps only its shard: fsdp_gradient_sync every_pass),
        or accumulated unsharded on every rank and reduced at the step's last pass (step)."""
        runner.set_requires_gradient_sync(sync or self.reduce_every_pass)
        return contextlib.nullcontext()

    def wrap(self, runner, model, around_shard=None):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 \
            else MixedPrecisionPolicy()
        layer_classes = decoder_layer_classes(model)
        layers = [m for m in model.modules() if type(m) in layer_classes]
        if not layers:
            raise ValueError(f"FSDP: no decoder layers found in {type(model).__name__} (_no_split_modules)")

        def shard(unit: torch.nn.Module) -> None:
            fully_shard(unit, mp_policy=policy)

        for unit in [*layers, runner]:
            around_shard(unit, shard) if around_shard else shard(unit)
        return runner


@dataclass
class OptimizerSpec:
    """AdamW as configured: its arguments, and weight decay for all but biases and norm weights."""

    weight_decay: float
    kwargs: dict  # lr, betas, eps

    @staticmethod
    def of(config: Config) -> "OptimizerSpec":
        return OptimizerSpec(config.weight_decay, {"lr": config.learning_rate, "eps": config.adam_epsilon,
                                                   "betas": (config.adam_beta1, config.adam_beta2)})

    def build(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameter_groups(model, self.weight_decay), **self.kwargs)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the optimizer's gradients (DTensor shards under FSDP2 are reduced to the full norm)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def gathered_model_state(runner: torch.nn.Module) -> dict:
    """The full (gathered, CPU) state dict of the user's model on the main process (a collective; the others get
    {}); a LoRA model's frozen base is left out (only the adapter is saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    adapter_only = hasattr(getattr(runner, "model", None), "get_base_model")
    state = get_model_state_dict(runner, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=adapter_only))
    return {user_model_key(key): value for key, value in state.items()}


def user_model_key(key: str) -> str:
    """A runner state-dict key as the user's model names it: everything up to the SupervisedLM's `model.` goes, however
    many wrappers an engine put around the runner (DDP's `module.`, FSDP (1)'s `_fsdp_wrapped_module.`, ...)."""
    parts = key.split(".")
    return ".".join(parts[parts.index("model") + 1:]) if "model" in parts[:-1] else key


def save_sharded_optimizer(runner: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shard of the optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(runner)
    dcp.save({"optimizer": get_optimizer_state_dict(runner, optimizer)}, checkpoint_id=directory / "optimizer")


def load_sharded_optimizer(runner: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    reshard(runner)
    state = {"optimizer": get_optimizer_state_dict(runner, optimizer)}
    dcp.load(state, checkpoint_id=directory / "optimizer")
    set_optimizer_state_dict(runner, optimizer, optim_state_dict=state["optimizer"])


def reshard(runner: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward pass until the next backward (the start-up checks,
    evaluation); the optimizer's state is keyed by the sharded ones, so they go back first."""
    from torch.distributed.fsdp import FSDPModule

    for module in runner.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The classes the model names as its unsplittable decoder layers (`_no_split_modules`), by name."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    return tuple(sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__))
