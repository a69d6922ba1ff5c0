"""`mftcoder plan`: a run's config turned into its memory per rank, its time, a verdict and advice. Reads the model's
config.json and the data's cached lengths; loads no weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from mftcoder.config import CPU_FORWARD_TOKENS, Config, resolve_for_world
from mftcoder.plan.memory import GIB, MemoryPlan, RunSetup, plan_memory, trainable_params
from mftcoder.plan.rates import rates_file
from mftcoder.plan.shape import ModelShape, PlanError, lora_layers, read_shape
from mftcoder.plan.timing import (ASSUMED_FILL, GPU_DEFAULT_MFU, Schedule, cached_stats, cpu_rates_for, cpu_step_terms,
                                  gpu_peak, gpu_step_terms, schedule, step_flops, step_work)

CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # assumption: CUDA context + kernels, outside the caching allocator
CUDA_ALLOCATOR_SLACK = 0.10  # assumption: reserved but unallocated blocks of the caching allocator, of the peak
CPU_RUNTIME_BYTES = int(0.35 * GIB)  # measured here: Python, torch and transformers imported (docs/benchmarks.md)
CPU_ALLOCATOR_SLACK = 0.40  # measured here: glibc's heap keeps freed blocks, peak RSS 1.1-1.6x the live tensors


@dataclass
class Target:
    """Where the run is planned for: 'cpu' or 'cuda', ranks, the memory each rank has, the matmul rate and MFU."""

    device: str = "cpu"
    nproc: int = 1
    memory_bytes: int | None = None
    gpu: str | None = None
    mfu: float | None = None


@dataclass
class Plan:
    shape: ModelShape
    run: RunSetup
    target: Target
    memory: MemoryPlan
    overhead_bytes: int
    schedule: Schedule
    flops_per_step: float
    time_terms: dict[str, float]  # seconds per term of one step (keys end in _s); their sum is the step time
    rate_source: str
    advice: list[tuple[str, int]] = field(default_factory=list)

    @property
    def device_peak(self) -> int:
        """What the device (or the process, on CPU) must hold: the tensors' peak plus the runtime and allocator."""
        return self.memory.peak + self.overhead_bytes

    @property
    def step_seconds(self) -> float:
        """The predicted step time: the sum of the time terms."""
        return sum(self.time_terms.values())

    @property
    def fits(self) -> bool | None:
        return None if self.target.memory_bytes is None else self.device_peak <= self.target.memory_bytes


def model_config_json(config: Config) -> dict:
    """The model's config.json as a mapping (model_config or pretrained_model_path), or PlanError."""
    from mftcoder.model import SHIPPED_MODEL_CONFIGS

    source = config.model_config or config.pretrained_model_path
    if not source:
        raise PlanError("no model: set pretrained_model_path or model_config")
    path = SHIPPED_MODEL_CONFIGS.get(source) or Path(source)
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read the model's config.json at {path} ({type(exc).__name__})") from None


def run_setup(config: Config, shape: ModelShape, target: Target, sched: Schedule | None = None) -> RunSetup:
    """The settings the formulas read, resolved as the trainer resolves them on `target` (dtypes, passes, engine)."""
    from mftcoder.model import lora_targets
    from mftcoder.objectives import make_objective

    cuda = target.device == "cuda"
    method = "qlora" if config.quantization else "lora" if config.peft_type else "full"
    if config.torch_dtype != "auto":
        weight = 2 if config.torch_dtype == "bfloat16" else 4
    else:
        weight = 2 if cuda and method != "full" else 4
    bf16 = config.bf16 if config.bf16 is not None else cuda
    parts = make_objective(config).records.parts
    row_tokens = config.seq_length * parts
    rows = config.per_device_train_batch_size or 8
    limit = config.max_forward_tokens if config.max_forward_tokens is not None else (0 if cuda else CPU_FORWARD_TOKENS)
    per_pass = max(1, min(rows, limit // row_tokens)) if limit else rows
    engine = config.distributed_strategy if target.nproc > 1 or config.distributed_strategy == "fsdp" else "single"
    attention = config.attn_implementation if config.attn_implementation != "auto" else "sdpa"
    return RunSetup(method, weight, 2 if bf16 else weight, config.lora_rank,
                    lora_layers(shape, lora_targets(config, shape.model_type)) if method != "full" else (),
                    config.lora_dropout > 0, config.quantization, config.checkpoint_activations, per_pass, row_tokens,
                    sched.supervised_fraction if sched else 0.6, -(-rows // per_pass), rows,
                    config.gradient_accumulation_steps, engine if engine in ("ddp", "fsdp") else "single",
                    target.nproc, config.fsdp_gradient_sync == "every_pass", attention,
                    row_fill=sched.row_fill if sched else ASSUMED_FILL,
                    fullest_pass_supervised=sched.fullest_pass_supervised if sched else None, foreach_optimizer=cuda)


def overhead(peak: int, target: Target) -> int:
    """The runtime and the allocator beyond the live tensors (assumed on CUDA, measured here on CPU)."""
    if target.device == "cuda":
        return CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * peak)
    return CPU_RUNTIME_BYTES + int(CPU_ALLOCATOR_SLACK * peak)


def make_plan(config: Config, target: Target, shape: ModelShape | None = None, steps: int | None = None,
              steps_per_epoch: int | None = None) -> Plan:
    """The whole plan; `steps` (and `steps_per_epoch`), when the trainer already knows them, replace the estimate."""
    from mftcoder.plan.advice import advise

    config = resolve_for_world(config, target.nproc)
    shape = shape or read_shape(model_config_json(config))
    probe = run_setup(config, shape, target)
    # 'auto' packs when the trainer's start-up check finds packed samples kept apart, as in every family planned here
    mode = "pack" if config.padding_mode == "auto" else config.padding_mode
    sched = schedule(config, cached_stats(config), target.nproc, probe.row_tokens, mode,
                     probe.rows_per_pass)
    if steps is not None:
        sched = dataclasses.replace(sched, total_steps=steps, steps_per_epoch=steps_per_epoch or sched.steps_per_epoch)
    run = run_setup(config, shape, target, sched)
    memory = plan_memory(shape, run)
    work = step_work(run, sched.supervised_fraction, sched.row_fill)
    if target.device == "cuda":
        peak, source = gpu_peak(target.gpu)
        mfu = target.mfu or GPU_DEFAULT_MFU
        terms, source = gpu_step_terms(shape, run, work, peak, mfu), f"{source} x MFU {mfu:.0%}"
    else:
        rates = cpu_rates_for(shape, run)
        terms = cpu_step_terms(shape, run, work, rates, target.mfu or 1.0)
        source = f"CPU rates measured on this CPU at the model's shapes (kept in {rates_file()}): {rates.describe()}"
        if target.mfu:
            source += f"; matmul rates x {target.mfu:g} (--mfu)"
    plan = Plan(shape, run, target, memory, overhead(memory.peak, target), sched, step_flops(shape, run, work),
                terms, source)
    plan.advice = advise(config, shape, target, plan)
    return plan


def peak_for(config: Config, shape: ModelShape, target: Target, supervised_fraction: float) -> int:
    """The device peak (tensors + overhead) of a variant of the run: what advice compares."""
    run = dataclasses.replace(run_setup(config, shape, target), supervised_fraction=supervised_fraction)
    memory = plan_memory(shape, run)
    return memory.peak + overhead(memory.peak, target)


def describe_method(plan: Plan) -> str:
    run = plan.run
    if run.method == "full":
        return "full fine-tuning"
    return (f"{'QLoRA ' + run.quantization if run.quantization else 'LoRA'} r={run.lora_rank} on "
            f"{len(run.lora_targets)} linear(s) per layer ({trainable_params(plan.shape, run) / 1e6:.2f}M trainable)")
