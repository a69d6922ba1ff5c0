"""Time: the data's token statistics (from the tokenized-data cache when there is one), tokens and FLOPs per step,
and the step time a stated matmul rate and MFU predict."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mftcoder.config import Config, split_fractions
from mftcoder.plan.memory import RunSetup
from mftcoder.plan.shape import ModelShape

# Dense bf16 peak TFLOP/s (vendor data sheets, no sparsity): assumptions until measured on that GPU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "RTX 4090": 165.0, "V100": 125.0}
GPU_DEFAULT_MFU = 0.35  # assumption: a dense decoder of >= 1B parameters with packed rows (docs/plan.md)
CPU_MFU = 0.55  # measured: SmolLM2-135M LoRA at the matmul rate of the same run, 48-65% (docs/benchmarks.md)
ASSUMED_FILL = 0.95  # packed rows' fill when the data's lengths are unknown


@dataclass
class DataStats:
    """Per-record token lengths and supervised tokens of the run's training data, or what was assumed."""

    lengths: np.ndarray | None
    supervised: np.ndarray | None
    source: str  # where the figures come from (a cache folder) or why they are unknown


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
    lengths, supervised, used = [], [], []
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
    return DataStats(np.concatenate(lengths), np.concatenate(supervised), f"tokenized cache ({', '.join(used)})")


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


def schedule(config: Config, stats: DataStats, nproc: int, row_capacity: int, packed: bool,
             pass_rows: int = 1) -> Schedule:
    """Steps follow from the training split's lengths (truncated to seq_length) packed first-fit into rows (as the
    trainer packs them, one window of the data at a time), rows per micro-batch, ranks and accumulation."""
    from mftcoder.data.batching import PACK_WINDOW, pack_first_fit_decreasing

    rows_per_step = config.per_device_train_batch_size * nproc * config.gradient_accumulation_steps
    if stats.lengths is None or not len(stats.lengths):
        tokens = int(rows_per_step * row_capacity * ASSUMED_FILL)
        return Schedule(ASSUMED_FILL, 0.6, None, None, config.max_steps if config.max_steps > 0 else None, tokens,
                        f"{stats.source}; assumed rows {ASSUMED_FILL:.0%} full and 60% of tokens supervised")
    train_share = split_fractions(config.data_split)[0]
    lengths = np.minimum(stats.lengths, config.seq_length)
    count = max(1, int(len(lengths) * train_share))
    order = np.random.default_rng(config.seed).permutation(len(lengths))[:count]
    lengths = lengths[order]
    if packed:
        bins = [[i + k for k in b] for i in range(0, len(lengths), PACK_WINDOW)
                for b in pack_first_fit_decreasing(lengths[i:i + PACK_WINDOW], row_capacity)]
    else:
        bins = [[k] for k in range(len(lengths))]
    rows = len(bins)
    fill = float(lengths.sum()) / (rows * row_capacity)
    steps = math.ceil(math.ceil(rows / (config.per_device_train_batch_size * nproc)) / config.gradient_accumulation_steps)
    total = steps * config.num_train_epochs
    if config.max_steps > 0:
        total = min(total, config.max_steps)
    supervised = float(np.minimum(stats.supervised, config.seq_length).sum() / max(1, stats.lengths.sum()))
    passes = total * nproc * config.gradient_accumulation_steps * -(-config.per_device_train_batch_size // pass_rows)
    fullest = fullest_pass(bins, np.minimum(stats.supervised[order], lengths), pass_rows, passes, config.seed)
    return Schedule(fill, supervised, fullest, steps, total, int(rows_per_step * row_capacity * fill),
                    f"from the {stats.source}: {count} training samples in {rows} rows ({fill:.0%} full)")


def fullest_pass(bins: list[list[int]], supervised: np.ndarray, pass_rows: int, passes: int, seed: int) -> int:
    """Supervised tokens of the fullest of the run's forward passes (at most an epoch's): the rows shuffled, as the
    trainer shuffles them, and taken pass_rows at a time. The output layer's logits chunk grows with them, so the
    run's peak is that pass's; a run shorter than an epoch sees a sample of its passes, as this does."""
    per_row = np.array([int(supervised[b].sum()) for b in bins])
    per_row = per_row[np.random.default_rng(seed).permutation(len(per_row))]
    sums = np.add.reduceat(per_row, np.arange(0, len(per_row), max(1, pass_rows)))[:max(1, passes)]
    return int(sums.max()) if len(sums) else 0


def step_flops(shape: ModelShape, run: RunSetup, tokens: int, supervised: int, row_tokens: int) -> float:
    """Useful FLOPs of a step: 6 N per token (forward 2, backward 4) for full fine-tuning, 4 N with a frozen base
    (LoRA: no weight gradients), the output layer only on supervised tokens (mftcoder's fused head), attention
    6 n^2 d per layer and row (causal half of forward and backward), and one more forward under checkpointing."""
    per_param = 4 if run.lora else 6
    recompute = 2 if run.checkpointing else 0
    body = (per_param + recompute) * shape.body_params * tokens
    head = per_param * shape.vocab * shape.hidden * supervised
    rows = max(1, tokens // max(1, row_tokens))
    attention = (6 + (2 if run.checkpointing else 0)) * rows * row_tokens ** 2 * shape.heads * shape.head_dim * shape.layers
    lora = 6 * shape.layers * sum(run.lora_rank * (l.fan_in + l.fan_out) for l in run.lora_targets) * tokens
    return float(body + head + attention + (lora if run.lora else 0))


def cpu_matmul_rate(tokens: int, hidden: int, intermediate: int, seconds: float = 0.3) -> float:
    """FLOP/s of float32 matmuls of the model's own shape on this machine, measured now (a fraction of a second)."""
    import torch

    a = torch.randn(min(tokens, 4096), hidden)
    b = torch.randn(hidden, max(hidden, intermediate))
    torch.mm(a, b)
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * count / (time.perf_counter() - started)


def gpu_peak(name: str | None) -> tuple[float, str]:
    """Dense bf16 peak FLOP/s of a GPU named like 'H100' (the table's data sheet figure) and where it came from."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if name and key.lower() in name.lower():
            return tflops * 1e12, f"{key} data sheet, dense bf16 {tflops:g} TFLOP/s (assumed)"
    return GPU_PEAK_TFLOPS["H100"] * 1e12, "unknown GPU: H100's dense bf16 989 TFLOP/s assumed (--gpu NAME to choose)"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
