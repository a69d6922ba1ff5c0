"""The reference model of a preference objective. With LoRA (or QLoRA) it is the base with the adapter switched off:
no second copy. With full fine-tuning every answer's reference log-prob is computed once, by the model before its
first update, and kept with the run (reference_logps.npz, keyed by the data and the model it came from)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mftcoder.config import Config, ConfigError
from mftcoder.data.batching import Batch, arrange_rows, micro_batches, plan_lengths
from mftcoder.objectives.pairs import sequence_sums

FILE = "reference_logps.npz"


class AdapterOffReference:
    """The base model: the same runner with the adapter disabled, without gradients."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, runner: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), self.model.disable_adapter():
            _, token_losses = runner(batch, keep_graph=True)  # the policy's output-layer code (no graph: no_grad)
        return -token_losses


class CachedReference:
    """Each answer's reference log-prob, placed by the collator at its first answer token (summing gives it back)."""

    def __call__(self, runner: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return batch.reference_logps[batch.loss_mask]


def make_reference(config: Config, parts):
    """The reference for this run: the adapter switched off, or the cached log-probs (computed now if missing)."""
    if hasattr(parts.model, "disable_adapter"):
        return AdapterOffReference(parts.model)
    key = reference_key(config, parts.data)
    path = parts.output_dir / FILE
    tables = read_tables(path, key, parts.data)
    if tables is None:
        if parts.resuming:
            raise ConfigError(f"{path}: the reference log-probs of this run are missing or were computed for other data "
                              "or another model; they come from the model before its first update, which a resumed "
                              "full fine-tuning run no longer has: start the run again (without "
                              "resume_from_checkpoint)")
        tables = compute_tables(config, parts)
        if parts.env.is_main:
            write_tables(path, key, tables)
    parts.reader.reference = tables
    return CachedReference()


def reference_key(config: Config, data) -> str:
    """Changes with the tokenized data, the length policy and the model the log-probs come from."""
    if config.pretrained_model_path:
        folder = Path(config.pretrained_model_path).resolve()
        model = [str(folder)] + sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                                       if p.is_file())
    else:
        model = [config.model_config, config.seed]
    settings = {"data": [t.data.digest for t in data.per_task], "seq_length": config.seq_length,
                "over_length": config.over_length, "model": model, "dtype": config.torch_dtype, "bf16": config.bf16,
                "attention": config.attn_implementation}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_tables(path: Path, key: str, data) -> list[np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        if str(saved["key"]) != key:
            return None
        tables = [saved[f"task{i}"] for i in range(len(data.per_task))]
    if any(table.shape != (len(t.data), 2) for table, t in zip(tables, data.per_task)):
        return None
    return tables


def write_tables(path: Path, key: str, tables: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.npz")
    np.savez(tmp, key=np.array(key), **{f"task{i}": table for i, table in enumerate(tables)})
    tmp.replace(path)


@torch.no_grad()
def compute_tables(config: Config, parts) -> list[np.ndarray]:
    """Every kept pair's reference log-probs [records, 2] per task, by the model as it is now; each rank runs its
    share of the batches (an empty share a stand-in, so sharded ranks stay in step), then the ranks sum them."""
    data, env, reader, runner = parts.data, parts.env, parts.reader, parts.runner
    plan = np.concatenate([np.stack([np.full(len(records), t.task.id), records], axis=1)
                           for t in data.per_task if len(records := np.concatenate([t.train, t.valid, t.test]))]
                          ).astype(np.int64)
    group = config.per_device_valid_batch_size * env.world_size
    rows = arrange_rows(plan, plan_lengths(data.per_task, plan), parts.padding_mode, config.seq_length * 2, group,
                        np.random.default_rng(0), window=len(plan))
    tables = [np.zeros((len(t.data), 2)) for t in data.per_task]
    runner.eval()
    for rows_of_batch in tqdm(micro_batches(rows, config.per_device_valid_batch_size, env.rank, env.world_size),
                              desc="reference log-probs", disable=not env.is_main, leave=False):
        batch = reader[rows_of_batch].to(env.device)
        with parts.autocast:
            _, token_losses = runner(batch, keep_graph=True)  # the policy's output-layer code (no graph: no_grad)
        if not rows_of_batch:
            continue
        sums = sequence_sums(batch, -token_losses)[0].cpu().numpy()  # pairs in example order: their order in rows
        for k, (task, record) in enumerate(pair for row in rows_of_batch for pair in row):
            tables[task][record] = sums[k]
    runner.train()
    flat = env.all_reduce_sum(torch.from_numpy(np.concatenate([t.ravel() for t in tables])))
    return [part.reshape(-1, 2).numpy() for part in torch.split(flat, [t.size for t in tables])]
