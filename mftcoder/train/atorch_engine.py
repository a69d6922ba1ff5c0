"""distributed_strategy: atorch. The model, optimizer and loss go through ATorch's `auto_accelerate` with a list of
its strategies (`atorch_strategy`); data, losses, checkpoints, resume and logs stay mftcoder's. Checkpoints have the
same layout as under ddp/fsdp, so they move between engines."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from mftcoder.atorch_strategy import GPU_ONLY, parse_strategy
from mftcoder.config import Config, ConfigError
from mftcoder.model import parameter_groups
from mftcoder.train.distributed import (DistEnv, Parallelism, clip_gradients, decoder_layer_classes,
                                        ensure_process_group)

DATA_PARALLEL = ("parallel_mode", "fsdp", "zero2")
WRAPS_MODULES = ("fsdp", "checkpoint")  # they rename the layers' modules, which PEFT's adapter saving does not follow


def default_strategy(device_type: str, lora: bool, checkpoint_activations: bool) -> list:
    """ATorch's strategy when atorch_strategy is null. On GPU the reference's: FSDP + bf16 + activation checkpointing
    (LoRA: bf16 only, see WRAPS_MODULES; checkpointing left to checkpoint_activations when that is on); on CPU plain
    data parallelism."""
    if device_type != "cuda":
        return ["parallel_mode"]
    if lora:
        return ["parallel_mode", ["amp_native", {"dtype": "bf16"}]]
    recompute = [] if checkpoint_activations else ["checkpoint"]
    return ["parallel_mode", "fsdp", ["amp_native", {"dtype": "bf16"}], *recompute]


def check_strategy(entries: list, device_type: str, world_size: int, checkpoint_activations: bool = False,
                   lora: bool = False, generation_eval: bool = False) -> None:
    """Refuse what would not train (or save) correctly here, each with its reason, before any model is built."""
    parsed = parse_strategy(entries)
    names = [name for name, _ in parsed]
    for name, settings in parsed:
        if generation_eval and name in ("fsdp", "zero2"):
            raise ConfigError(f"generation_eval: generating during training gathers FSDP2 shards; ATorch's {name!r} "
                              "shards with FSDP (1), which it does not gather; evaluate checkpoints with mftcoder eval")
        if device_type != "cuda" and name in GPU_ONLY:
            raise ConfigError(f"atorch_strategy: {name!r} needs a GPU: {GPU_ONLY[name]}")
        if lora and name in WRAPS_MODULES:
            raise ConfigError(f"atorch_strategy: {name!r} with peft_type: lora: ATorch wraps each layer in a module of "
                              "its own, and PEFT's adapter saving does not see through the new module names (measured "
                              "with checkpoint: an empty adapter); use checkpoint_activations: true for activation "
                              "checkpointing")
        if name == "amp_native" and _half_dtype(settings) is not torch.bfloat16:
            raise ConfigError("atorch_strategy: amp_native in float16 needs a loss scaler, which mftcoder's gradient "
                              "clipping and NaN skipping do not drive; write [amp_native, {dtype: bf16}]")
        if name == "zero1" and importlib.util.find_spec("fairscale") is None:
            raise ConfigError("atorch_strategy: zero1 is fairscale's OSS optimizer and fairscale is not installed "
                              "(ATorch would skip zero1 with only a log line): bash scripts/setup.sh atorch")
    if world_size > 1 and not set(names) & set(DATA_PARALLEL):
        raise ConfigError(f"atorch_strategy: {names} has no data-parallel entry, so the {world_size} processes would "
                          "train apart; add 'parallel_mode'")
    if "checkpoint" in names and checkpoint_activations:
        raise ConfigError("checkpoint_activations: true and atorch_strategy 'checkpoint' would both recompute the "
                          "decoder layers; keep one of them")


def _half_dtype(settings: Any) -> torch.dtype | None:
    dtype = settings.get("dtype") if isinstance(settings, dict) else None
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(dtype) if isinstance(dtype, str) else None


def load_strategy(entries: list, model: torch.nn.Module) -> list:
    """The list auto_accelerate takes: layer class names become the model's classes (the decoder layers by default),
    checkpointing is non-reentrant unless asked otherwise, dtypes become torch dtypes."""
    layers = decoder_layer_classes(model)
    resolved: list = []
    for name, settings in parse_strategy(entries):
        if name == "checkpoint":
            if settings is None or isinstance(settings, (list, tuple)):
                settings = {"wrap_class": settings}
            settings = {**settings, "wrap_class": _classes(settings.get("wrap_class"), model, layers),
                        "no_reentrant": settings.get("no_reentrant", True)}
        elif name == "fsdp":
            settings = {"sync_module_states": True, "use_orig_params": True, "limit_all_gathers": True,
                        **(settings or {})}
            settings["atorch_wrap_cls"] = _classes(settings.get("atorch_wrap_cls"), model, layers)
        elif name == "amp_native":
            settings = {**(settings or {}), "dtype": torch.bfloat16}
        resolved.append(name if settings is None else (name, settings))
    return resolved


def _classes(names: Any, model: torch.nn.Module, default: tuple[type, ...]) -> tuple[type, ...]:
    if not names:
        if not default:
            raise ConfigError(f"atorch_strategy: {type(model).__name__} names no decoder layers (_no_split_modules); "
                              "give the layer classes, e.g. [checkpoint, [LlamaDecoderLayer]]")
        return default
    names = [names] if isinstance(names, str) else names
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"atorch_strategy: no module class {missing[0]!r} in {type(model).__name__} "
                          f"(decoder layers: {', '.join(c.__name__ for c in default) or 'none'})")
    return tuple(by_name[n] for n in names)


def tensor_bytes(tensor: torch.Tensor, name: str) -> bytes:
    """The raw little-endian bytes of a contiguous dense tensor: what safetensors <= 0.7's private `_tobytes` returned,
    which ATorch 0.2.5 imports (for its FSDP flat-checkpoint writer) and safetensors 0.8 removed."""
    if tensor.layout != torch.strided:
        raise ValueError(f"You are trying to save a sparse tensor: `{name}` which this library does not support.")
    if not tensor.is_contiguous():
        raise ValueError(f"You are trying to save a non contiguous tensor: `{name}` which is not allowed.")
    flat = tensor.detach().to("cpu").reshape(-1)
    if flat.numel() == 0:
        return b""
    raw = flat.view(torch.uint8)
    width = flat.element_size() // (2 if flat.is_complex() else 1)  # complex: each float part on its own
    if sys.byteorder == "big" and width > 1:
        raw = raw.reshape(-1, width).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def import_auto_accelerate():
    """atorch.auto.auto_accelerate. ATorch 0.2.5 imports `_tobytes` from safetensors.torch, which safetensors 0.8
    removed; the stand-in goes in first where it is missing (nothing of safetensors is replaced)."""
    import safetensors.torch

    if not hasattr(safetensors.torch, "_tobytes"):
        safetensors.torch._tobytes = tensor_bytes
    try:
        with warnings.catch_warnings():  # ATorch's own deprecation notices about torch.cuda.amp and apex
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*apex.*")
            from atorch.auto import auto_accelerate
    except ImportError as exc:
        raise ConfigError(f"distributed_strategy: atorch needs ATorch ({exc}); install it with "
                          "bash scripts/setup.sh atorch (or pip install -e '.[atorch]')") from None
    return auto_accelerate


def _runner_loss(batch, output):
    """auto_accelerate's loss function: the runner already returns (loss, token losses)."""
    return output[0]


class AtorchEngine(Parallelism):
    """auto_accelerate builds the wrapped runner and the optimizer; saving and resume are mftcoder's, gathered the
    FSDP way when ATorch sharded the model, consolidated on rank 0 for zero1's sharded optimizer."""

    def __init__(self, env: DistEnv, config: Config, bf16: bool):
        super().__init__(env, bf16)
        lora = bool(config.peft_type)
        self.strategy = config.atorch_strategy if config.atorch_strategy is not None else \
            default_strategy(env.device.type, lora, config.checkpoint_activations)
        check_strategy(self.strategy, env.device.type, env.world_size, config.checkpoint_activations, lora,
                       bool(config.generation_eval))
        self.loss_func = _runner_loss
        self.fsdp_root: torch.nn.Module | None = None

    def prepare(self, runner, model, optimizer, around_shard=None):
        auto_accelerate = import_auto_accelerate()
        ensure_process_group(self.env)  # ATorch's parallel groups need a process group, even of one
        status, result, _ = auto_accelerate(
            runner, torch.optim.AdamW, loss_func=_runner_loss, optim_args=dict(optimizer.kwargs),
            optim_param_func=lambda wrapped: parameter_groups(wrapped, optimizer.weight_decay),
            load_strategy=load_strategy(self.strategy, model), ignore_dryrun_on_load_strategy=True)
        if not status:
            raise RuntimeError(f"ATorch's auto_accelerate failed for atorch_strategy {self.strategy} (its log above "
                               "says why)")
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.fsdp_root = next((m for m in result.model.modules() if isinstance(m, FullyShardedDataParallel)), None)
        self.sharded = self.fsdp_root is not None
        self.loss_func = result.loss_func
        return result.model, result.optim

    def loss(self, batch, output):
        return self.loss_func(batch, output)

    def clip_gradients(self, runner, optimizer, max_norm):
        if self.sharded:  # FSDP (1): each rank holds a shard of each gradient; its root reduces the norm
            return float(self.fsdp_root.clip_grad_norm_(max_norm))
        return clip_gradients(optimizer, max_norm)

    def save_optimizer(self, runner, optimizer, directory: Path) -> None:
        if hasattr(optimizer, "consolidate_state_dict"):  # zero1 (fairscale OSS): every rank sends rank 0 its shard
            optimizer.consolidate_state_dict(recipient_rank=0)
        super().save_optimizer(runner, optimizer, directory)  # zero1 loads it whole on every rank, keeping its shard
