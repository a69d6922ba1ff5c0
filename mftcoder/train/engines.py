"""The engine distributed_strategy names: ddp and fsdp (train/distributed.py), atorch (train/atorch_engine.py). Here,
above both, so the engines need not import each other."""

from __future__ import annotations

from mftcoder.config import Config
from mftcoder.train.atorch_engine import AtorchEngine
from mftcoder.train.distributed import DataParallel, DistEnv, FullyShard, Parallelism


def make_parallelism(env: DistEnv, config: Config, bf16: bool) -> Parallelism:
    """The engine distributed_strategy names (one process without one: no wrapping; ATorch is asked even then)."""
    if config.distributed_strategy == "atorch":
        return AtorchEngine(env, config, bf16)
    if config.distributed_strategy == "fsdp":
        return FullyShard(env, bf16, reduce_every_pass=config.fsdp_gradient_sync == "every_pass")
    return DataParallel(env, bf16) if env.distributed else Parallelism(env, bf16)
