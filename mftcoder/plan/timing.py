"""Time: the data's token statistics (from the tokenized-data cache when there is one), tokens and FLOPs per step,
and the step time as a sum of terms: on CPU each term is work (FLOPs, bytes, operators) over a rate measured at the
model's shapes (mftcoder/plan/rates.py); on CUDA the FLOPs over the GPU's data-sheet peak x MFU."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mftcoder.config import Config, split_fractions
from mftcoder.plan.memory import RunSetup, trainable_bytes
from mftcoder.plan.rates import CpuRates, measure_cpu_rates, rank_threads
from mftcoder.plan.shape import ModelShape

# Dense bf16 peak TFLOP/s (vendor data sheets, no sparsity): assumptions until measured on that GPU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "RTX 4090": 165.0, "V100": 125.0}
GPU_DEFAULT_MFU = 0.35  # assumption: a dense decoder of >= 1B parameters with packed rows (docs/plan.md)
ASSUMED_FILL = 0.95  # packed rows' fill when the data's lengths are unknown


@dataclass
class DataStats:
    """Per-record token lengths and supervised tokens of the run's training data, or what was assumed."""

    lengths: np.ndarray | None
    supervised: np.ndarray | None
    source: str  # where the figures come from (a cache folder) or why they are unknown
    task_sizes: tuple[tuple[str, int], ...] = ()  # (task name, records) in data order: lengths are their concatenation


def _task_folders(config: Config) -> list[tuple[str, Path]]:
    tasks = [(Path(p).name, Path(p)) for p in config.data_paths] + [(n, Path(p)) for n, p in config.tasks.items()]
    return [(name, path) for name, path in tasks if path.is_dir()]


def cached_stats(config: Config) -> DataStats:
    """Token lengths from each task's newest tokenized cache that reads the same files (no tokenizer is loaded, so
    the tokenizer it was made with is not checked); unknown when a task has none (`mftcoder data check` makes it)."""
    from mftcoder.data.tokenize import default_cache_root

    tasks = _task_folders(config)
    if not tasks:
        return DataStats(None, None, "no data_paths: steps per epoch unknown")
    root = Path(config.data_cache_dir) if config.data_cache_dir else default_cache_root()
    lengths, supervised, used, sizes = [], [], [], []
    for name, folder in tasks:
        files = sorted(str(p) for p in folder.rglob("*.jsonl"))
        found = []
        for meta_path in root.glob(f"{name}-*/meta.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if sorted(meta.get("files", [])) == files and meta.get("parts", 1) == 1:
                found.append((meta.get("built_at", 0), meta_path.parent))
        if not found:
            return DataStats(None, None, f"task {name} has no tokenized cache in {root}: steps per epoch unknown "
                             "(run `mftcoder data check CONFIG` once, then plan again)")
        folder_used = max(found)[1]
        starts = np.load(folder_used / "index.npz")["starts"]
        mask = np.memmap(folder_used / "mask.bin", dtype=np.uint8, mode="r") if starts[-1] else np.zeros(1, np.uint8)
        length = np.diff(starts)
        kept = length > 0
        lengths.append(length[kept])
        supervised.append(np.add.reduceat(mask, starts[:-1][kept]).astype(np.int64) if kept.any() else length[kept])
        used.append(folder_used.name)
        sizes.append((name, int(kept.sum())))
    return DataStats(np.concatenate(lengths), np.concatenate(supervised), f"tokenized cache ({', '.join(used)})",
                     tuple(sizes))


def epoch_records(config: Config, stats: DataStats) -> np.ndarray:
    """Indices into stats.lengths of one epoch's training records, as the trainer draws them: each task's train split
    (split_indices), repeated by its data_weights (2.5 = twice plus a random half), shuffled together."""
    from mftcoder.data.tasks import split_indices, task_rng

    fractions, picked, start = split_fractions(config.data_split), [], 0
    weights = config.data_weights
    for k, (name, size) in enumerate(stats.task_sizes):
        weight = weights.get(name, 1.0) if isinstance(weights, dict) else (weights[k] if k < len(weights) else 1.0)
        train = start + split_indices(size, fractions, config.seed, name, config.shuffle_before_split)[0]
        whole, fraction = int(weight), weight - int(weight)
        picked += [np.tile(train, whole)]
        if fraction > 0:
            rng = task_rng(config.seed, name, "sample-epoch-0")
            picked.append(rng.choice(train, size=round(fraction * len(train)), replace=False))
        start += size
    records = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return records[np.random.default_rng([config.seed, 0, 0x5EED]).permutation(len(records))]


@dataclass
class Schedule:
    """Rows and tokens of a step and of an epoch, from the data's lengths or assumed."""

    row_fill: float  # real tokens / row capacity
    supervised_fraction: float  # supervised tokens / real tokens, over the epoch
    fullest_pass_supervised: int | None  # supervised tokens of the epoch's fullest forward pass (None: unknown)
    steps_per_epoch: int | None
    total_steps: int | None
    tokens_per_step: int  # real tokens, all ranks
    note: str


def schedule(config: Config, stats: DataStats, nproc: int, row_capacity: int, mode: str,
             pass_rows: int = 1) -> Schedule:
    """Steps follow from the training split's lengths, drawn and arranged into rows by the trainer's own functions
    (epoch_records, batching.arrange_rows: packing, dynamic grouping or padding), rows per micro-batch, ranks and
    accumulation: with the data cached, the steps of an epoch are the trainer's."""
    from mftcoder.data.batching import arrange_rows

    rows_per_step = config.per_device_train_batch_size * nproc * config.gradient_accumulation_steps
    if stats.lengths is None or not len(stats.lengths):
        tokens = int(rows_per_step * row_capacity * ASSUMED_FILL)
        return Schedule(ASSUMED_FILL, 0.6, None, None, config.max_steps if config.max_steps > 0 else None, tokens,
                        f"{stats.source}; assumed rows {ASSUMED_FILL:.0%} full and 60% of tokens supervised")
    order = epoch_records(config, stats)
    lengths = np.minimum(stats.lengths, config.seq_length)
    plan = np.stack([np.zeros(len(order), dtype=np.int64), order], axis=1)
    rows = arrange_rows(plan, lengths[order], mode, row_capacity, config.per_device_train_batch_size * nproc,
                        np.random.default_rng([config.seed, 0, 0xA11]))
    fill = float(lengths[order].sum()) / (len(rows) * row_capacity)
    steps = math.ceil(math.ceil(len(rows) / (config.per_device_train_batch_size * nproc)) / config.gradient_accumulation_steps)
    total = steps * config.num_train_epochs
    if config.max_steps > 0:
        total = min(total, config.max_steps)
    # over the epoch's records as cut to seq_length (the supervised tokens of a cut record: at most its length)
    supervised = float(np.minimum(stats.supervised, lengths)[order].sum() / max(1, lengths[order].sum()))
    passes = total * nproc * config.gradient_accumulation_steps * -(-config.per_device_train_batch_size // pass_rows)
    row_supervised = [int(np.minimum(stats.supervised, lengths)[row[:, 1]].sum()) for row in rows]
    fullest = fullest_pass(row_supervised, pass_rows, passes)
    return Schedule(fill, supervised, fullest, steps, total, int(rows_per_step * row_capacity * fill),
                    f"from the {stats.source}: {len(order)} training samples in {len(rows)} rows ({fill:.0%} full)")


def fullest_pass(row_supervised: list[int], pass_rows: int, passes: int) -> int:
    """Supervised tokens of the fullest of the run's forward passes (at most an epoch's): the rows in the trainer's
    order, taken pass_rows at a time. The output layer's logits chunk grows with them, so the run's peak is that
    pass's."""
    per_row = np.array(row_supervised, dtype=np.int64)
    sums = np.add.reduceat(per_row, np.arange(0, len(per_row), max(1, pass_rows)))[:max(1, passes)] if len(per_row) else []
    return int(max(sums)) if len(sums) else 0


# --- step time: a sum of terms --------------------------------------------------------------------------------------
# Elementwise float32 elements read and written per token and decoder layer, forward and backward (norms, rotary,
# activation functions, residual adds, SDPA's layout copies, autograd's gradient sums): a x hidden + b x intermediate,
# counted by `bench/plan_calibrate.py ops` on transformers 5 (views excluded). Full fine-tuning / frozen base.
ELEMENTWISE_PER_TOKEN = {"gated": ((148.0, 18.0), (140.0, 18.0)), "neox": ((76.0, 6.0), (71.0, 5.0))}
MASK_BYTES_PER_TOKEN_AND_ROW_TOKEN = 5.0  # the block-diagonal mask's per-layer copies and their backward (same count)
OPS_PER_LAYER = {"gated": (229, 186), "neox": (149, 113)}  # aten operators, forward + backward (same count)
ADAMW_ACCESSES = 20  # per-tensor AdamW reads + writes per element (decay, lerp, mul+addcmul, sqrt, div, add, addcdiv)
CLIP_ACCESSES = 3  # gradient clipping: the norm reads each gradient, the scaling reads and writes it
STEP_OVERHEAD_S = 0.02  # assumed: the step's Python (batch collation, loss bookkeeping, logging); not yet measured


@dataclass(frozen=True)
class StepWork:
    """What one rank computes in one optimizer step: padded tokens and rows through the model, supervised tokens
    through the output layer, forward passes, and the run's settings."""

    tokens: int
    rows: int
    supervised: int
    passes: int


def step_work(run: RunSetup, supervised_fraction: float, row_fill: float) -> StepWork:
    """One rank's step: micro_batch_rows x accumulation rows of row_tokens (rows are padded to the widest, which packed
    rows nearly fill), of which row_fill x supervised_fraction are supervised, in passes_per_step x accumulation."""
    rows = run.micro_batch_rows * run.accumulation
    tokens = rows * run.row_tokens
    return StepWork(tokens, rows, int(tokens * row_fill * supervised_fraction), run.passes_per_step * run.accumulation)


def linear_flops(shape: ModelShape, tokens: int) -> float:
    """Forward FLOPs of the decoder layers' linears: 2 x their weights x tokens."""
    return 2.0 * shape.layers * sum(l.fan_in * l.fan_out for l in shape.linears) * tokens


def forward_passes(run: RunSetup) -> int:
    """Forward-equivalents of a linear's matmuls: 3 with a weight gradient (forward, input and weight gradients),
    2 for a frozen base (no weight gradient), + 1 when checkpointing recomputes the forward."""
    return (2 if run.lora else 3) + run.checkpointing


def adapter_flops(shape: ModelShape, run: RunSetup, tokens: int) -> float:
    """LoRA's own matmuls: 2 x adapter parameters x tokens forward, x 3 with their gradients (+1 recomputed)."""
    if not run.lora:
        return 0.0
    adapters = shape.layers * sum(run.lora_rank * (l.fan_in + l.fan_out) for l in run.lora_targets)
    return 2.0 * adapters * tokens * (3 + run.checkpointing)


def attention_flops(shape: ModelShape, run: RunSetup, rows: int) -> float:
    """Scores and weighted values, 4 x row_tokens^2 x heads x head_dim per row and layer forward, x 3 with backward
    (+1 recomputed): every row x row pair, as CPU SDPA computes them under the packed rows' block-diagonal mask."""
    forward = 4.0 * rows * run.row_tokens ** 2 * shape.heads * shape.head_dim * shape.layers
    return forward * (3 + run.checkpointing)


def head_flops(shape: ModelShape, run: RunSetup, supervised: int) -> float:
    """The output layer at supervised positions only (mftcoder's fused head): 2 x vocab x hidden per token forward,
    as much for the hidden states' gradient, and (full fine-tuning) as much for the weight's."""
    return 2.0 * shape.vocab * shape.hidden * supervised * (2 if run.lora else 3)


def step_flops(shape: ModelShape, run: RunSetup, work: StepWork) -> float:
    """All matmul FLOPs of one rank's step: the linears, LoRA's adapters, attention and the output layer."""
    return (linear_flops(shape, work.tokens) * forward_passes(run) + adapter_flops(shape, run, work.tokens)
            + attention_flops(shape, run, work.rows) + head_flops(shape, run, work.supervised))


def elementwise_bytes(shape: ModelShape, run: RunSetup, work: StepWork) -> float:
    """Bytes the decoder layers' elementwise kernels move: (a x hidden + b x intermediate) elements per token and layer
    (+ a forward's share again when checkpointing), and the mask's copies, row_tokens bytes per token and layer."""
    a, b = ELEMENTWISE_PER_TOKEN[shape.layout][run.lora]
    recompute = 1 + (0.4 if run.checkpointing else 0.0)  # a forward is about 2/5 of forward + backward's elements
    elements = (a * shape.hidden + b * shape.intermediate) * recompute * shape.layers * work.tokens * run.act_bytes
    mask = MASK_BYTES_PER_TOKEN_AND_ROW_TOKEN * run.row_tokens * shape.layers * work.tokens
    return elements + mask


def dispatch_ops(shape: ModelShape, run: RunSetup, work: StepWork) -> int:
    """Operators the decoder layers launch in a step: per layer and pass (+ the forward's again when checkpointing)."""
    per_layer = OPS_PER_LAYER[shape.layout][run.lora]
    return int(per_layer * (1.4 if run.checkpointing else 1.0) * shape.layers * work.passes)


def dequantized_weights(shape: ModelShape, run: RunSetup, work: StepWork) -> int:
    """QLoRA: bitsandbytes' 4-bit matmul dequantizes each linear's weight in forward and again in backward (CPU: no
    fused kernel for training), once more when checkpointing recomputes the forward; per pass."""
    if not run.quantization:
        return 0
    return shape.layers * sum(l.fan_in * l.fan_out for l in shape.linears) * (2 + run.checkpointing) * work.passes


def optimizer_bytes_moved(shape: ModelShape, run: RunSetup) -> float:
    """AdamW (per tensor) and gradient clipping over this rank's trainable elements: ADAMW_ACCESSES + CLIP_ACCESSES
    reads and writes of each, in the trainable dtype (LoRA float32); FSDP: a rank steps its shard."""
    shards = run.nproc if run.engine == "fsdp" else 1
    return trainable_bytes(shape, run) / shards * (ADAMW_ACCESSES + CLIP_ACCESSES)


def communication_bytes(shape: ModelShape, run: RunSetup, work: StepWork) -> tuple[float, float]:
    """Bytes a rank receives per step, (all-gathered, reduce-scattered). FSDP2: each pass all-gathers the weights for
    forward and again for backward ((n-1)/n of them), and reduce-scatters the float32 gradients every pass
    (fsdp_gradient_sync every_pass) or once; DDP: all-reduces the gradients once a step (a reduce-scatter and an
    all-gather, (n-1)/n of them each)."""
    n = run.nproc
    if n == 1 or run.engine == "single":
        return 0.0, 0.0
    share = (n - 1) / n
    grads = trainable_bytes(shape, run)
    if run.engine == "ddp":
        return share * grads, share * grads
    syncs = work.passes if run.fsdp_every_pass else 1
    return share * 2 * work.passes * shape.params * run.weight_bytes, share * syncs * grads


def cpu_step_terms(shape: ModelShape, run: RunSetup, work: StepWork, rates: CpuRates,
                   efficiency: float = 1.0) -> dict[str, float]:
    """The CPU step time as seconds per term (each key ends in _s); `efficiency` scales the matmul-bound rates
    (linears, adapters, attention, output layer: --mfu)."""
    flops = lambda frozen: (rates.frozen_linear_flops if frozen else rates.linear_flops) * efficiency  # noqa: E731
    linear = linear_flops(shape, work.tokens)
    terms = {
        "linears_s": linear * forward_passes(run) / flops(run.lora),
        "lora_adapters_s": adapter_flops(shape, run, work.tokens)
        / ((rates.adapter_flops or rates.linear_flops) * efficiency),
        "attention_s": attention_flops(shape, run, work.rows) / (rates.attention_flops * efficiency),
        "output_layer_s": work.supervised * shape.vocab / (rates.head_logits * efficiency),
        "elementwise_s": elementwise_bytes(shape, run, work) / rates.activation_bandwidth,
        "operator_dispatch_s": dispatch_ops(shape, run, work) * rates.op_seconds,
        "dequantization_s": dequantized_weights(shape, run, work) / rates.dequantize_weights
        if run.quantization and rates.dequantize_weights else 0.0,
        "optimizer_s": optimizer_bytes_moved(shape, run) / rates.weight_bandwidth,
    }
    gathered, scattered = communication_bytes(shape, run, work)
    terms["communication_s"] = gathered / rates.gloo_gather_bytes + scattered / rates.gloo_scatter_bytes
    terms["step_overhead_s"] = STEP_OVERHEAD_S
    return terms


def cpu_rates_for(shape: ModelShape, run: RunSetup) -> CpuRates:
    """The rates measured at this model's shapes with the threads one of the run's ranks has (kept on disk)."""
    adapters = tuple((l.fan_in, l.fan_out) for l in run.lora_targets) if run.lora else ()
    return measure_cpu_rates(run.pass_tokens, shape.hidden, shape.intermediate, shape.heads, shape.head_dim,
                             shape.vocab, run.row_tokens, run.quantization == "nf4", rank_threads(run.nproc),
                             run.lora and run.lora_dropout, adapters, run.lora_rank, frozen_head=run.lora)


def gpu_step_terms(shape: ModelShape, run: RunSetup, work: StepWork, peak_flops: float, mfu: float) -> dict[str, float]:
    """CUDA: the step's matmul FLOPs at the GPU's data-sheet peak x MFU, one term (the rest is folded into MFU)."""
    return {"compute_s": step_flops(shape, run, work) / (peak_flops * mfu)}


def gpu_peak(name: str | None) -> tuple[float, str]:
    """Dense bf16 peak FLOP/s of a GPU named like 'H100' (the table's data sheet figure) and where it came from."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if name and key.lower() in name.lower():
            return tflops * 1e12, f"{key} data sheet, dense bf16 {tflops:g} TFLOP/s (assumed)"
    return GPU_PEAK_TFLOPS["H100"] * 1e12, "unknown GPU: H100's dense bf16 989 TFLOP/s assumed (--gpu NAME to choose)"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
