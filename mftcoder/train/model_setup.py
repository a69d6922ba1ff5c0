"""The model as it trains: loaded (or resumed), LoRA and activation checkpointing applied, placed on the device (under
FSDP filled shard by shard from rank 0's host copy), wrapped by its engine with its optimizer, and checked as it will
run: the fused output layer, and whether packed samples stay apart."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mftcoder.config import Config, forward_token_limit
from mftcoder.families import check_attention, computes_in_float32, packs_as_one_row
from mftcoder.loss import SupervisedLM
from mftcoder.model import load_base_model, prepare_for_training, save_dtype
from mftcoder.train import checkpoint as ckpt
from mftcoder.train.distributed import DistEnv, OptimizerSpec, Parallelism, reshard
from mftcoder.train.engines import make_parallelism
from mftcoder.train.model_checks import CheckContext, check_runner, probe_samples
from mftcoder.train.run_folder import RANDOM_BASE
from mftcoder.train.sharded_load import RankZeroLoad


@dataclass
class ModelSetup:
    model: torch.nn.Module  # the user's model (PEFT-wrapped with LoRA), as checkpoints save it
    runner: torch.nn.Module  # what the loop calls: SupervisedLM around the model, wrapped by the engine
    optimizer: torch.optim.Optimizer
    parallel: Parallelism
    autocast: contextlib.AbstractContextManager
    forward_tokens: int  # max_forward_tokens as resolved for the device
    padding_mode: str  # as decided at start-up (or as the resumed checkpoint recorded)
    save_dtype: torch.dtype


def bf16_autocast(config: Config, device: torch.device) -> tuple[contextlib.AbstractContextManager, bool]:
    """bf16 autocast when asked for, or by default on a GPU that supports it (never by default on CPU: measured here,
    CPU bf16 autocast was far slower than fp32)."""
    use_bf16 = config.bf16
    if use_bf16 is None:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not use_bf16:
        return contextlib.nullcontext(), False
    return torch.autocast(device.type, dtype=torch.bfloat16), True


def set_up_model(config: Config, env: DistEnv, tokenizer, template, per_task, resume_from: Path | None,
                 output_dir: Path) -> ModelSetup:
    resume_full = resume_from is not None and not ckpt.is_adapter(resume_from)
    full_weights = ckpt.model_weights(resume_from) if resume_full else None
    dtype = save_dtype(config)

    def make(empty: bool) -> torch.nn.Module:
        base = load_base_model(config, tokenizer, template, full_weights, empty=empty)
        if config.peft_type and not config.pretrained_model_path and env.is_main and not empty:
            ckpt.save_random_base(base, tokenizer, output_dir / RANDOM_BASE, dtype, resume_from is not None)
        model = prepare_for_training(base, config)
        if resume_from and ckpt.is_adapter(resume_from) and not empty:
            ckpt.load_adapter(resume_from, model)
        return model

    # Under FSDP the model that trains is an empty twin and rank 0 reads the weights into a host copy alone.
    loading = RankZeroLoad(env, sharded=config.distributed_strategy == "fsdp")
    model = loading.build(make)
    # A quantized base was loaded onto env.device (bitsandbytes weights stay put); an empty one stays on meta.
    if not config.quantization and not loading.active:
        model = model.to(env.device)
    autocast, use_bf16 = bf16_autocast(config, env.device)
    check_attention(model, env.device, use_bf16)
    parallel = make_parallelism(env, config, use_bf16)
    supervised = SupervisedLM(model, flat_packing=packs_as_one_row(getattr(model.config, "_attn_implementation", None)))
    runner, optimizer = loading.prepare(parallel, supervised, model, OptimizerSpec.of(config))
    context = CheckContext(env.device, autocast, computes_in_float32(model, use_bf16), env.all_reduce_max,
                           tqdm.write if env.is_main else None)
    padding_mode = check_runner(supervised, runner, config.padding_mode, probe_samples(per_task),
                                tokenizer.pad_token_id, context)
    reshard(runner)  # FSDP2 keeps the root unsharded after the checks' forward passes: let it go now
    if resume_from is not None:  # the batches (and so the data order) follow the checkpoint's decision
        padding_mode = ckpt.resumed_padding_mode(resume_from, padding_mode, context.say)
    return ModelSetup(model, runner, optimizer, parallel, autocast, forward_token_limit(config, env.device.type),
                      padding_mode, dtype)
