#!/usr/bin/env python
"""Training throughput of mftcoder (pack / dynamic / padding) against Hugging Face `Trainer` and TRL `SFTTrainer`.

    python bench/throughput.py             # the main table (~11 minutes on 2 CPU cores)
    python bench/throughput.py --quick     # a smoke test on a tiny subset (< 2 minutes)
    python bench/throughput.py --scaling   # seq_length sweep, a wider model, tokenization time (~7 minutes)

Every variant trains the same tiny random-initialised GPT-NeoX (hidden 64, 2 layers, GPT-NeoX-20B vocabulary,
fixed seed) for one pass over exactly the same samples, in its own fresh subprocess, so its peak memory is that
process's maximum RSS. Token ids and loss masks come from mftcoder's renderer for every variant; the loss is
the plain token mean over bot tokens + EOS everywhere (mftcoder `case1`). Throughput counts only the training
steps: mftcoder's `RunResult.train_seconds`; for HF/TRL a callback timing from the first `on_step_begin` to the
last `on_step_end`, with real and supervised tokens counted from the batches those steps trained on.
The Markdown report goes to stdout and to `--report` (default bench/results.md, bench/results-scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

TASKS = ("code_generation", "code_docstring", "code_multiturn")
RESULT_MARK = "BENCH_RESULT "
SEED = 42
LEARNING_RATE = 1e-3
BATCH_SIZE = 8

# The tiny model: embeddings and output layer dominate (2 x 50304 x 64 weights vs ~0.1M in the body).
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
# A body-dominated model for the scaling section (~25M parameters in the body, ~51M in embeddings + head).
WIDE = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 2048}
BASE_MODEL = {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 50304,
    "max_position_embeddings": 4096, "hidden_act": "gelu", "attention_bias": True, "attention_dropout": 0.0,
    "hidden_dropout": 0.0, "classifier_dropout": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-5,
    "use_parallel_residual": True, "tie_word_embeddings": False, "use_cache": False, "is_decoder": False,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
    "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"},
}

MAIN_VARIANTS = ("mftcoder-pack", "mftcoder-dynamic", "mftcoder-padding", "hf-trainer", "trl-sft", "trl-sft-packing")
BASELINE = "hf-trainer"


# =========================================================================== helpers shared by all processes


def pack_available() -> bool:
    """Whether this mftcoder accepts padding_mode: pack."""
    from mftcoder.config import fields

    return "pack" in (fields()["padding_mode"].metadata.get("choices") or ())


def renderer(tokenizer_dir: str | None = None):
    """The shipped tokenizer and mftcoder's template, or a model's tokenizer with its own chat template."""
    from mftcoder.config import build_config
    from mftcoder.model import load_tokenizer

    values = {"tokenizer_path": tokenizer_dir, "chat_template": "model"} if tokenizer_dir else {}
    tokenizer, template = load_tokenizer(build_config(values)[0])
    tokenizer.model_max_length = 10**9  # counting only; no "longer than 2048" warnings
    return tokenizer, template


def load_samples(data_dirs: list[str], seq_length: int, tokenizer_dir: str | None = None):
    """(ids, mask) per sample, tokenized by mftcoder's renderer and truncated to seq_length, in task order.

    Same length policy as mftcoder's default (`over_length: truncate`): a sample whose supervised tokens were
    all cut away is dropped (mask position 0 never counts: nothing predicts the first token)."""
    import numpy as np

    from mftcoder.data.records import parse_record
    from mftcoder.data.tokenize import encode_conversations

    tokenizer, template = renderer(tokenizer_dir)
    samples = []
    for folder in data_dirs:
        for path in sorted(Path(folder).rglob("*.jsonl")):
            records = [parse_record(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for ids, mask in encode_conversations(tokenizer, template, records):
                ids, mask = ids[:seq_length].astype(np.int64), mask[:seq_length].astype(np.int64)
                if mask[1:].sum() > 0:
                    samples.append((ids, mask))
    return samples, tokenizer


def expected_counts(samples) -> dict:
    return {"samples": len(samples), "tokens": int(sum(len(ids) for ids, _ in samples)),
            "supervised": int(sum(int(mask[1:].sum()) for _, mask in samples))}


def build_model(model_values: dict, tokenizer):
    """The same random-initialised model mftcoder builds from a config (seeded, sdpa attention, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_values), attn_implementation="sdpa")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model


def peak_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # Linux reports KiB


# =========================================================================== workers (one per subprocess)


def worker_mftcoder(spec: dict) -> dict:
    from mftcoder.config import build_config
    from mftcoder.train.loop import train

    work = Path(spec["work"])
    values = {
        "data_paths": spec["data_dirs"], "model_config": spec["model_json"], "output_dir": str(work / "out"),
        "data_cache_dir": spec["cache_dir"], "seq_length": spec["seq_length"], "data_split": "1,0,0",
        "weighted_loss_mode": "case1", "padding_mode": spec["mode"], "per_device_train_batch_size": BATCH_SIZE,
        "gradient_accumulation_steps": 1, "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant",
        "num_warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "num_train_epochs": 1,
        "evaluation_strategy": "no", "evaluate_before_training": False, "save_strategy": "steps",
        "checkpointing_steps": 10**9, "log_interval": 10**9, "seed": SEED, "bf16": False, "num_workers": 0,
    }
    config, _ = build_config(values)
    result = train(config)
    return {"train_seconds": result.train_seconds, "tokens": result.tokens_seen,
            "supervised": result.supervised_tokens_seen, "steps": len(result.step_losses),
            "mean_loss": sum(result.step_losses) / max(1, len(result.step_losses)),
            "last_loss": result.step_losses[-1] if result.step_losses else float("nan")}


def step_timer():
    """A TrainerCallback measuring wall time from the first on_step_begin to the last on_step_end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.first_begin = None
            self.last_end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_begin is None:
                self.first_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.last_end = time.perf_counter()

        @property
        def seconds(self) -> float:
            return (self.last_end - self.first_begin) if self.first_begin is not None else 0.0

    return StepTimer()


def counting(trainer_cls):
    """A subclass of an HF trainer that counts real and supervised tokens and the loss of every trained batch."""

    class Counting(trainer_cls):
        def __init__(self, *args, **kwargs):
            self.counted_tokens = self.counted_supervised = self.counted_batches = 0
            self.losses: list[float] = []
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            if "attention_mask" in inputs:
                self.counted_tokens += int(inputs["attention_mask"].sum())
            else:  # padding-free (TRL packing): one flattened row, no pad (pad_to_multiple_of is None on CPU)
                self.counted_tokens += int(inputs["input_ids"].numel())
            self.counted_supervised += int((labels[:, 1:] != -100).sum())
            self.counted_batches += 1
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            # Trainer scales by the step's token count (num_items_in_batch); with no accumulation this is the mean
            self.losses.append(float(loss.detach()))
            return out

    return Counting


def trainer_result(trainer, timer) -> dict:
    """A counting HF/TRL trainer's measurements after train(): the training window, token counts and losses."""
    return {"train_seconds": timer.seconds, "tokens": trainer.counted_tokens, "supervised": trainer.counted_supervised,
            "steps": trainer.counted_batches, "mean_loss": sum(trainer.losses) / max(1, len(trainer.losses)),
            "last_loss": trainer.losses[-1] if trainer.losses else float("nan")}


class PaddingCollator:
    """Pad to the longest sample of the batch; labels = ids on bot tokens + EOS, -100 elsewhere (and on pad)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask = torch.as_tensor(f["mask"], dtype=torch.bool)
            n = len(ids)
            input_ids[row, :n] = ids
            attention[row, :n] = 1
            labels[row, :n] = torch.where(mask, ids, torch.full_like(ids, -100))
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class ListDataset:
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def common_training_args(work: Path) -> dict:
    return dict(output_dir=str(work / "hf"), per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=1,
                num_train_epochs=1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, logging_strategy="no", save_strategy="no", eval_strategy="no",
                report_to=[], dataloader_num_workers=0, use_cpu=True, seed=SEED, data_seed=SEED, disable_tqdm=True,
                bf16=False, fp16=False, gradient_checkpointing=False, train_sampling_strategy="sequential")


def shuffled(samples: list, seed: int = SEED) -> list:
    """One seeded order for HF and TRL (sequential sampler over it): identical batches for both."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order]


def worker_hf(spec: dict) -> dict:
    from transformers import Trainer, TrainingArguments

    samples, tokenizer = load_samples(spec["data_dirs"], spec["seq_length"])
    items = [{"input_ids": ids.tolist(), "mask": mask.tolist()} for ids, mask in shuffled(samples)]
    model = build_model(spec["model"], tokenizer)
    args = TrainingArguments(**common_training_args(Path(spec["work"])), remove_unused_columns=False)
    timer = step_timer()
    trainer = counting(Trainer)(model=model, args=args, train_dataset=ListDataset(items),
                                data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=[timer])
    trainer.train()
    return trainer_result(trainer, timer)


def check_trl_labels(dataset, samples) -> tuple[int, int]:
    """Every (packed) row TRL prepared, cut at its sample boundaries, must be one of our samples with labels equal to
    the ids exactly at our mask's bot + EOS tokens and -100 everywhere else. Returns (samples matched, supervised)."""
    reference: dict[tuple, list] = {}
    for ids, mask in samples:
        reference.setdefault(tuple(ids.tolist()), []).append(mask.tolist())
    matched = supervised = 0
    for row in dataset:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        lengths = list(row["seq_lengths"]) if "seq_lengths" in row and row["seq_lengths"] else [len(ids)]
        start = 0
        for n in lengths:
            seg_ids, seg_labels = ids[start:start + n], labels[start:start + n]
            start += n
            masks = reference.get(tuple(seg_ids))
            if not masks:
                raise AssertionError("TRL produced a sequence that is none of our samples (truncated or merged?)")
            expected = [[t if m else -100 for t, m in zip(seg_ids, mask)] for mask in masks]
            if seg_labels not in expected:
                raise AssertionError("TRL's labels differ from mftcoder's loss mask (loss is not completion-only)")
            matched += 1
            supervised += sum(1 for x in seg_labels[1:] if x != -100)
        if start != len(ids):
            raise AssertionError("TRL's seq_lengths do not cover the packed row")
    return matched, supervised


def check_trl_loss(trainer, model) -> float:
    """TRL's training loss on one prepared row equals the cross-entropy over the labelled positions only."""
    import torch
    import torch.nn.functional as F

    batch = trainer.data_collator([trainer.train_dataset[0]])
    was_training = model.training
    model.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss_unchecked(model, dict(batch)))
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        manual = float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100))
    model.train(was_training)
    if abs(trl_loss - manual) > 1e-4 * max(1.0, abs(manual)):
        raise AssertionError(f"TRL loss {trl_loss} != masked cross-entropy {manual}")
    return abs(trl_loss - manual)


def worker_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    samples, tokenizer = load_samples(spec["data_dirs"], spec["seq_length"])
    ordered = shuffled(samples)
    dataset = Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in ordered],
                                 "completion_mask": [mask.tolist() for _, mask in ordered]})
    model = build_model(spec["model"], tokenizer)
    packing = spec["mode"] == "packing"
    args = SFTConfig(**common_training_args(Path(spec["work"])), max_length=spec["seq_length"], packing=packing,
                     completion_only_loss=True, shuffle_dataset=False, dataset_num_proc=None)
    timer = step_timer()

    class Checked(counting(SFTTrainer)):
        def compute_loss_unchecked(self, model, inputs):
            return SFTTrainer.compute_loss(self, model, inputs)

    trainer = Checked(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    # Completion-only loss, checked before training: TRL's prepared labels are exactly our mask, and its loss is
    # exactly the cross-entropy over those labels.
    matched, supervised = check_trl_labels(trainer.train_dataset, samples)
    expected = expected_counts(samples)
    if matched != expected["samples"] or supervised != expected["supervised"]:
        raise AssertionError(f"TRL prepared {matched} samples / {supervised} supervised tokens, expected "
                             f"{expected['samples']} / {expected['supervised']}")
    loss_gap = check_trl_loss(trainer, model)
    trainer.train()
    return {**trainer_result(trainer, timer),
            "note": f"labels = our mask on all {matched} samples; loss = masked CE (|diff| {loss_gap:.1e})"}


def worker_tokenize(spec: dict) -> dict:
    """mftcoder's cached tokenizer (load_tokenized) on fresh cache dirs, for several record counts."""
    import numpy as np

    from mftcoder.data import tokenize as tokenize_module
    from mftcoder.data.tasks import discover_tasks
    from mftcoder.data.tokenize import load_tokenized

    tokenizer, template = renderer()
    rows = []
    for size, folder in spec["sizes"]:
        (task,) = discover_tasks([folder])
        cache = Path(spec["work"]) / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        data = load_tokenized(task, tokenizer, template, cache)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        again = load_tokenized(task, tokenizer, template, cache)
        cached_seconds = time.perf_counter() - started
        assert again.from_cache and len(again) == len(data)
        num_bytes = sum(p.stat().st_size for p in task.files)
        parallel = num_bytes >= getattr(tokenize_module, "PARALLEL_MIN_BYTES", float("inf"))
        rows.append({"records": len(data), "tokens": int(np.asarray(data.lengths).sum()), "seconds": seconds,
                     "cached_seconds": cached_seconds, "bytes": num_bytes,
                     "processes": (os.cpu_count() or 1) if parallel else 1})
    return {"rows": rows}


WORKERS = {"mftcoder": worker_mftcoder, "hf": worker_hf, "trl": worker_trl, "tokenize": worker_tokenize}


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    result = WORKERS[spec["kind"]](spec)
    result["process_seconds"] = time.perf_counter() - started
    result["peak_rss"] = peak_rss_bytes()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# =========================================================================== the parent: data, subprocesses, report


def ensure_data(data_root: Path, per_task: int) -> dict:
    """Build the benchmark data when it is missing or was built differently; return its profile.json."""
    import build_bench_data

    meta_path = data_root / "profile.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == build_bench_data.FORMAT and meta.get("per_task", 0) >= per_task and all(
                (data_root / t / "train.jsonl").exists() for t in TASKS):
            return meta
    print(f"building benchmark data in {data_root} ...", flush=True)
    return build_bench_data.build(data_root, per_task, 0, 5000, "transformers")


def write_subset(data_root: Path, out: Path, per_task: int) -> list[str]:
    """The first per_task records of every task (the builder already shuffled them), as task folders."""
    dirs = []
    for task in TASKS:
        lines = (data_root / task / "train.jsonl").read_text(encoding="utf-8").splitlines()[:per_task]
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        dirs.append(str(folder))
    return dirs


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(limit: float, threshold: float = 0.3) -> float | None:
    """Wait (up to `limit` seconds) until the rest of the machine uses < threshold cores; return that load."""
    deadline = time.perf_counter() + limit
    while True:
        before = cpu_busy_seconds()
        time.sleep(2.0)
        after = cpu_busy_seconds()
        load = (after - before) / 2.0 if before is not None and after is not None else None
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


def run_worker(spec: dict, work: Path, name: str, timeout: float, wait_idle: float = 0.0,
               script: Path | None = None) -> dict:
    """Run one variant in a fresh Python process; its result, or an error with the log's tail.

    Also measures how busy the rest of the machine was meanwhile (other processes' cores, from /proc/stat
    minus this subprocess's own CPU time): with 2 cores, anything else running skews the numbers."""
    if wait_idle > 0:
        load = wait_for_idle(wait_idle)
        if load is not None and load >= 0.3:
            print(f"  (machine still busy: {load:.1f} cores in use by others)", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "work": str(work)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / "log.txt"
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TQDM_DISABLE": "1"}
    print(f"  {name} ...", end="", flush=True)
    busy_before, own_before = cpu_busy_seconds(), children_cpu_seconds()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, str(script or Path(__file__).resolve()), "--worker", str(spec_path)],
                                  stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout, env=env, cwd=str(REPO))
        stdout = proc.stdout
        code = proc.returncode
    except subprocess.TimeoutExpired:
        stdout, code = "", "timeout"
    wall = time.perf_counter() - started
    busy_after, own_after = cpu_busy_seconds(), children_cpu_seconds()
    other_load = None
    if busy_before is not None and busy_after is not None:
        other_load = max(0.0, (busy_after - busy_before) - (own_after - own_before)) / max(wall, 1e-9)
    result_lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if code != 0 or not result_lines:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        print(f" FAILED ({code}, {wall:.0f}s); log {log_path}:\n    " + "\n    ".join(tail), flush=True)
        return {"error": f"exit {code}; see log", "wall": wall}
    result = json.loads(result_lines[-1][len(RESULT_MARK):])
    result["wall"] = wall
    result["others"] = other_load
    speed = (f"{result['train_seconds']:.1f}s training, {result['supervised'] / result['train_seconds']:.0f} "
             "supervised tok/s, ") if result.get("train_seconds") else ""
    print(f" {wall:.0f}s wall, {speed}peak RSS {result['peak_rss'] / 2**30:.2f} GiB"
          + (f", other processes {other_load:.2f} cores" if other_load is not None else ""), flush=True)
    return result


def variant_spec(variant: str, data_dirs: list[str], seq_length: int, model: dict, model_json: str,
                 cache_dir: str) -> dict:
    base = {"data_dirs": data_dirs, "seq_length": seq_length, "model": model, "model_json": model_json,
            "cache_dir": cache_dir}
    if variant.startswith("mftcoder-"):
        return {**base, "kind": "mftcoder", "mode": variant.split("-", 1)[1]}
    if variant == "hf-trainer":
        return {**base, "kind": "hf"}
    if variant == "trl-sft":
        return {**base, "kind": "trl", "mode": "no-packing"}
    if variant == "trl-sft-packing":
        return {**base, "kind": "trl", "mode": "packing"}
    raise ValueError(variant)


DESCRIPTIONS = {
    "mftcoder-pack": "mftcoder `padding_mode: pack`",
    "mftcoder-dynamic": "mftcoder `padding_mode: dynamic`",
    "mftcoder-padding": "mftcoder `padding_mode: padding` (pad to seq_length)",
    "hf-trainer": "HF `Trainer`, pad to longest in batch",
    "trl-sft": "TRL `SFTTrainer`, no packing",
    "trl-sft-packing": "TRL `SFTTrainer`, `packing=True` (bfd)",
}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def results_table(results: dict[str, dict], expected: dict, baseline: str = BASELINE) -> str:
    base = results.get(baseline, {})
    base_rate = base["supervised"] / base["train_seconds"] if base.get("train_seconds") else None
    base_rss = base.get("peak_rss")
    lines = ["| variant | steps | supervised tok/s | real tok/s | × HF Trainer (supervised tok/s) | peak RSS GiB | "
             "RSS / HF | train s | wall s | supervised tokens | real tokens | mean loss | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = DESCRIPTIONS.get(name, name)
        if "pending" in r:
            lines.append(f"| {label} | pending: {r['pending']} |" + " |" * 12)
            continue
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} |" + " |" * 12)
            continue
        sup_rate = r["supervised"] / r["train_seconds"]
        real_rate = r["tokens"] / r["train_seconds"]
        ratio = f"{sup_rate / base_rate:.2f}×" if base_rate else "-"
        rss_ratio = f"{r['peak_rss'] / base_rss:.2f}" if base_rss else "-"
        same = "" if r["supervised"] == expected["supervised"] else " (≠ expected!)"
        lines.append(f"| {label} | {r['steps']} | {sup_rate:.0f} | {real_rate:.0f} | {ratio} | {gib(r['peak_rss'])} | "
                     f"{rss_ratio} | {r['train_seconds']:.1f} | {r['wall']:.0f} | {r['supervised']}{same} | "
                     f"{r['tokens']} | {r['mean_loss']:.3f} | {others(r)} |")
    return "\n".join(lines)


def others(r: dict) -> str:
    """Cores used by other processes while the variant ran (should be ~0 for clean numbers)."""
    return "-" if r.get("others") is None else f"{r['others']:.2f}"


def rate(r: dict) -> float | None:
    return r["supervised"] / r["train_seconds"] if r and r.get("train_seconds") else None


def targets_section(results: dict[str, dict]) -> str:
    pack, hf, trl = results.get("mftcoder-pack", {}), results.get("hf-trainer", {}), results.get("trl-sft-packing", {})
    lines = ["| target | measured | met |", "|---|---:|:---:|"]

    def row(name: str, value: float | None, goal: float, fmt: str, at_most: bool = False):
        if value is None:
            lines.append(f"| {name} | pending | - |")
        else:
            met = value <= goal if at_most else value >= goal
            lines.append(f"| {name} | {fmt.format(value)} | {'yes' if met else 'no'} |")

    row("pack ≥ 3× HF Trainer supervised tok/s", rate(pack) / rate(hf) if rate(pack) and rate(hf) else None, 3.0,
        "{:.2f}×")
    row("pack ≥ 1.5× TRL packing supervised tok/s", rate(pack) / rate(trl) if rate(pack) and rate(trl) else None, 1.5,
        "{:.2f}×")
    row("pack peak RSS ≤ 0.5 × HF Trainer's", pack["peak_rss"] / hf["peak_rss"]
        if pack.get("peak_rss") and hf.get("peak_rss") else None, 0.5, "{:.2f}×", at_most=True)
    return "\n".join(lines)


def code_line() -> str:
    """Which mftcoder was measured: the commit, and whether mftcoder/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mftcoder"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "mftcoder: unknown revision"
    if not head:
        return "mftcoder: not a git checkout"
    return f"mftcoder at commit {head}" + (" plus uncommitted changes under mftcoder/" if dirty else "")


def machine_line() -> str:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl {trl_version}")


def profile_line(samples) -> str:
    import numpy as np

    lengths = np.array([len(ids) for ids, _ in samples])
    sup = sum(int(m[1:].sum()) for _, m in samples)
    return (f"{len(samples)} samples after truncation: median {np.median(lengths):.0f} tokens, p90 "
            f"{np.percentile(lengths, 90):.0f}, max {lengths.max()}, {lengths.sum()} tokens, supervised fraction "
            f"{sup / lengths.sum():.3f}")


def main_table(args, work: Path) -> str:
    meta = ensure_data(args.data, args.build_per_task)
    per_task = args.samples // len(TASKS)
    data_dirs = write_subset(args.data, work / "data", per_task)
    samples, _ = load_samples(data_dirs, args.seq_length)
    expected = expected_counts(samples)
    model = {**BASE_MODEL, **TINY}
    model_json = work / "model.json"
    model_json.write_text(json.dumps(model, indent=1))
    variants = args.variants or list(MAIN_VARIANTS)
    has_pack = pack_available()
    print(f"main table: {expected['samples']} samples ({per_task} per task), seq_length {args.seq_length}, "
          f"batch {BATCH_SIZE}; padding_mode pack {'available' if has_pack else 'NOT available yet'}", flush=True)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for variant in variants:
        if variant == "mftcoder-pack" and not has_pack:
            results[variant] = {"pending": "this mftcoder has no `padding_mode: pack` yet"}
            print(f"  {variant}: pending (no padding_mode: pack in mftcoder/config.py)", flush=True)
            continue
        spec = variant_spec(variant, data_dirs, args.seq_length, model, str(model_json), str(work / "cache"))
        results[variant] = run_worker(spec, work / variant, variant, args.timeout, args.wait_idle)
    total = time.perf_counter() - started
    whole = meta["profile"]["all"]
    return "\n".join([
        f"## Throughput: tiny GPT-NeoX, seq_length {args.seq_length}, batch {BATCH_SIZE}, one pass",
        "",
        f"- Machine: {machine_line()}; {code_line()}",
        f"- Data: `{args.data}` ({whole['count']} records of {meta['package']} {meta['package_version']}: median "
        f"{whole['median']:.0f} tokens, p90 {whole['p90']:.0f}, max {whole['max']}, supervised fraction "
        f"{whole['supervised_fraction']:.3f}); this run trains on the first {per_task} of each task: "
        f"{profile_line(samples)}",
        f"- Model: GPT-NeoX hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']} heads, intermediate {model['intermediate_size']}, vocab {model['vocab_size']}, "
        f"random init (seed {SEED}), fp32; AdamW lr {LEARNING_RATE} constant, grad clip 1.0, loss = token mean over "
        "bot tokens + EOS",
        f"- Every variant should train on {expected['supervised']} supervised and {expected['tokens']} real tokens "
        "(a mismatch is flagged in the table). Wall s = the whole subprocess (imports, tokenization, model build, "
        "training, mftcoder's final checkpoint); throughput uses train s only. Other load = cores busy with "
        "other processes meanwhile (from /proc/stat).",
        f"- Benchmark time: {total / 60:.1f} minutes",
        "",
        results_table(results, expected),
        "",
        "Targets (mftcoder pack):",
        "",
        targets_section(results),
        "",
        *[f"- {DESCRIPTIONS[k]}: {r['note']}" for k, r in results.items() if r.get("note")],
    ])


def scaling_sections(args, work: Path) -> str:
    import build_bench_data

    meta = ensure_data(args.data, args.build_per_task)
    has_pack = pack_available()
    mode = "mftcoder-pack" if has_pack else "mftcoder-dynamic"
    sections = []
    started = time.perf_counter()
    per_task = args.scaling_samples // len(TASKS)
    data_dirs = write_subset(args.data, work / "data", per_task)
    tiny = {**BASE_MODEL, **TINY}
    tiny_json = work / "tiny.json"
    tiny_json.write_text(json.dumps(tiny, indent=1))
    print(f"scaling: {per_task * len(TASKS)} samples; mftcoder variant: {mode}", flush=True)

    # 1. seq_length sweep
    rows = ["| seq_length | samples | mftcoder sup tok/s | HF sup tok/s | × HF | mftcoder RSS GiB | HF RSS GiB | "
            "RSS ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seq_length in args.seq_lengths:
        samples, _ = load_samples(data_dirs, seq_length)
        got = {}
        for variant in (mode, "hf-trainer"):
            spec = variant_spec(variant, data_dirs, seq_length, tiny, str(tiny_json), str(work / "cache"))
            got[variant] = run_worker(spec, work / f"seq{seq_length}-{variant}", f"seq {seq_length} {variant}",
                                      args.timeout, args.wait_idle)
        m, h = got[mode], got["hf-trainer"]
        if "error" in m or "error" in h:
            rows.append(f"| {seq_length} | {len(samples)} | failed | | | | | |")
            continue
        rows.append(f"| {seq_length} | {len(samples)} | {rate(m):.0f} | {rate(h):.0f} | {rate(m) / rate(h):.2f}× | "
                    f"{gib(m['peak_rss'])} | {gib(h['peak_rss'])} | {m['peak_rss'] / h['peak_rss']:.2f} |")
    sections += [f"### seq_length sweep ({DESCRIPTIONS[mode]} vs HF Trainer, tiny model, "
                 f"{per_task * len(TASKS)} samples)", "", *rows, ""]

    # 2. a body-dominated model
    wide = {**BASE_MODEL, **WIDE}
    wide_json = work / "wide.json"
    wide_json.write_text(json.dumps(wide, indent=1))
    wide_dirs = write_subset(args.data, work / "data-wide", args.wide_samples // len(TASKS))
    rows = ["| model | body params | samples | mftcoder sup tok/s | HF sup tok/s | × HF | mftcoder RSS GiB | "
            "HF RSS GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, values, path in (("tiny (hidden 64, 2 layers)", tiny, tiny_json),
                                ("wide (hidden 512, 8 layers)", wide, wide_json)):
        got = {}
        for variant in (mode, "hf-trainer"):
            spec = variant_spec(variant, wide_dirs, 1024, values, str(path), str(work / "cache"))
            got[variant] = run_worker(spec, work / f"model-{values['hidden_size']}-{variant}",
                                      f"{label} {variant}", args.timeout, args.wait_idle)
        m, h = got[mode], got["hf-trainer"]
        body = body_parameters(values)
        if "error" in m or "error" in h:
            rows.append(f"| {label} | {body / 1e6:.1f}M | {args.wide_samples} | failed | | | | |")
            continue
        rows.append(f"| {label} | {body / 1e6:.1f}M | {len(load_samples(wide_dirs, 1024)[0])} | {rate(m):.0f} | "
                    f"{rate(h):.0f} | {rate(m) / rate(h):.2f}× | {gib(m['peak_rss'])} | {gib(h['peak_rss'])} |")
    sections += [f"### Model size (seq_length 1024; embeddings + output layer are 2 × 50304 × hidden)", "", *rows, ""]

    # 3. tokenization time with mftcoder's cached tokenizer
    tok_root = args.data / "_tokenization"
    sizes = sorted(args.tokenize_sizes)
    need = -(-max(sizes) // len(TASKS))
    ensure_data(tok_root, need)
    records = []
    per = [(tok_root / t / "train.jsonl").read_text(encoding="utf-8").splitlines() for t in TASKS]
    for i in range(need):
        records += [lines[i] for lines in per if i < len(lines)]
    folders = []
    for size in sizes:
        folder = work / "tokenize" / str(size) / "records"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("\n".join(records[:size]) + "\n", encoding="utf-8")
        folders.append((size, str(folder)))
    result = run_worker({"kind": "tokenize", "sizes": folders}, work / "tokenize-run", "tokenization", args.timeout,
                        args.wait_idle)
    rows = ["| records | MB of JSONL | tokens | processes | tokenize + cache s | records/s | tokens/s | "
            "load from cache s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.get("rows", []):
        rows.append(f"| {r['records']} | {r['bytes'] / 1e6:.1f} | {r['tokens']} | {r['processes']} | {r['seconds']:.2f} | "
                    f"{r['records'] / r['seconds']:.0f} | {r['tokens'] / r['seconds']:.0f} | {r['cached_seconds']:.3f} |")
    sections += ["### Tokenization (`mftcoder.data.tokenize.load_tokenized`, fresh cache dir, default workers)", "",
                 *rows, ""]
    total = time.perf_counter() - started
    return "\n".join([f"## Scaling", "", f"- Machine: {machine_line()}; {code_line()}", f"- Benchmark time: {total / 60:.1f} minutes",
                      f"- Data: `{args.data}` ({meta['profile']['all']['count']} records); tokenization rows use "
                      f"`{tok_root}` ({max(sizes)} records, same builder)", "", *sections])


def body_parameters(values: dict) -> int:
    h, i, layers = values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"]
    per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h  # qkv + dense, mlp, two layer norms
    return layers * per_layer + 2 * h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny subset, short sequences: a smoke test (< 2 min)")
    parser.add_argument("--scaling", action="store_true", help="run the scaling sections instead of the main table")
    parser.add_argument("--data", type=Path, default=BENCH / "data", help="benchmark data (built if missing)")
    parser.add_argument("--samples", type=int, default=None, help="samples in the main table (split over 3 tasks)")
    parser.add_argument("--seq-length", type=int, default=None, help="seq_length of the main table (default 1024)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated subset of {','.join(MAIN_VARIANTS)}")
    parser.add_argument("--report", type=Path, default=None,
                        help="Markdown report (default bench/results.md; with --scaling bench/results-scaling.md)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a variant's process is stopped")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each variant, wait up to this long for other processes to go quiet")
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    args.build_per_task = 200
    if args.quick:
        args.samples = args.samples or 18
        args.seq_length = args.seq_length or 256
        args.scaling_samples, args.wide_samples = 18, 9
        args.seq_lengths, args.tokenize_sizes = [128, 256], [300, 600]
    else:
        args.samples = args.samples or 150
        args.seq_length = args.seq_length or 1024
        args.scaling_samples, args.wide_samples = 60, 24
        args.seq_lengths, args.tokenize_sizes = [256, 512, 1024, 2048], [1000, 2000, 4000, 8000]
    if args.report is None:
        args.report = BENCH / ("results-scaling.md" if args.scaling else "results.md")
    work = Path(tempfile.mkdtemp(prefix="mftcoder-bench-"))
    started = time.perf_counter()
    try:
        body = scaling_sections(args, work) if args.scaling else main_table(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    command = "python bench/throughput.py" + (" --quick" if args.quick else "") + (" --scaling" if args.scaling else "")
    report = (f"# mftcoder throughput benchmark\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}, "
              f"{(time.perf_counter() - started) / 60:.1f} minutes)\n\n{body}\n")
    print()
    print(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report, encoding="utf-8")
    print(f"report written to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
