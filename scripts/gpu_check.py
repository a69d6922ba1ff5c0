"""One-call GPU check: trains random-initialised models of real shapes with `mftcoder train` from this checkout, with
whatever torch and transformers the machine has (no install, no network), and prints one table.

    python3 scripts/gpu_check.py [--out DIR] [--wheels DIR] [--cpu] [--budget SECONDS] [--steps N] [--only TEXT]

On a GPU machine: a SmolLM2-135M-shaped Llama and a ~1B Llama (the shipped GPT-NeoX tokenizer's vocabulary, so nothing
is downloaded), each trained for a few steps on the shipped demo data under torchrun with one process per GPU: full
fine-tuning under FSDP2 (float32 master weights, bf16 compute) packed and unpacked per attention kernel (sdpa,
flex_attention, flash_attention_2 where flash_attn imports), LoRA (bf16 base), and QLoRA where bitsandbytes imports.
Each row reports tokens/s, MFU (6 x body parameters x tokens/s over the GPUs' dense bf16 peak), peak GPU memory
(torch.cuda.max_memory_allocated of rank 0, start-up included) and the step-0 validation loss, which for every packed
row must equal its unpacked reference within 1e-2 (bf16). Exits non-zero if any row fails; rows that would run past
--budget (default 450 s: the whole check ends within 8 minutes) are skipped and reported as such.

--cpu (or no GPU): the same rows on the shipped tiny model, 2 processes of FSDP2 on gloo, float32, 2 steps, tolerance 1e-4: a
rehearsal of this script with the GPU machine's packages (tests/test_gpu_check.py runs it offline).
--wheels DIR: pure-Python or manylinux wheels to add (pip install --no-deps --no-index --target), e.g. bitsandbytes.
--out DIR: where table.txt, results.json and logs.txt go (the work folder, with checkpoints, is a temporary one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mftcoder" / "assets" / "demo_data"
# dense bf16 tensor-core peak (no sparsity), TFLOP/s, by device name; first match wins
PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989), ("B200", 2250),
               ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121)]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "vocab_size": 50304, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "initializer_range": 0.02}
MODELS = {  # the shipped tokenizer has 50,277 tokens, so both take its 50,304-row vocabulary
    "smollm2-135m": {**LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
    "llama-1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
                 "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
}


@dataclass
class Row:
    model: str
    mode: str  # full | lora | qlora
    kernel: str
    padding: str  # pack | dynamic
    reference: str | None = None  # the unpacked row whose step-0 validation loss this one must equal
    engine: str | None = None  # distributed_strategy, when not the mode's own (fsdp; ddp for QLoRA)
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.mode}-{self.padding}-{self.kernel}" + (f"-{self.engine}" if self.engine else "")


def plan(gpu: bool, kernels: list[str], bnb: bool, atorch: bool) -> list[Row]:
    """The rows, most important first (a tight --budget skips the last ones). With ATorch importable, one more row per
    model: distributed_strategy atorch (its default strategy for the device) against the unpacked fsdp row."""
    if not gpu:
        ref = "tiny-test-full-dynamic-sdpa"
        # LoRA starts as the base model (B = 0), so its step-0 loss has the full row's reference
        rows = [Row("tiny-test", "full", "sdpa", "dynamic"), Row("tiny-test", "full", "sdpa", "pack", ref),
                Row("tiny-test", "full", "eager", "pack", ref), Row("tiny-test", "lora", "sdpa", "pack", ref)]
        return rows + ([Row("tiny-test", "full", "sdpa", "dynamic", ref, engine="atorch")] if atorch else [])
    # A LoRA row's base is bf16 (the GPU default) and a full row's float32, so each mode has its own unpacked reference.
    rows = [Row("smollm2-135m", "full", "sdpa", "dynamic")]
    rows += [Row("smollm2-135m", "full", k, "pack", "smollm2-135m-full-dynamic-sdpa") for k in kernels]
    rows += [Row("smollm2-135m", "lora", "sdpa", "pack")]
    if bnb:  # its base: the random base the LoRA row saved; nf4 weights, so its own losses and no reference
        rows += [Row("smollm2-135m", "qlora", "sdpa", "pack")]
    rows += [Row("llama-1b", "lora", "sdpa", "dynamic"), Row("llama-1b", "lora", "sdpa", "pack", "llama-1b-lora-dynamic-sdpa"),
             Row("llama-1b", "full", "sdpa", "pack")]  # FSDP2 full fine-tuning at 1B: memory and speed
    rows += [Row("llama-1b", "lora", k, "pack", "llama-1b-lora-dynamic-sdpa") for k in kernels if k != "sdpa"]
    if atorch:
        rows += [Row("smollm2-135m", "full", "sdpa", "dynamic", "smollm2-135m-full-dynamic-sdpa", engine="atorch")]
    return rows


def config_for(row: Row, gpu: bool, work: Path, steps: int, nproc: int) -> dict:
    values = {
        "data_paths": [str(DEMO / t) for t in ("code_generation", "code_docstring", "code_multiturn")],
        "data_split": "95,5,0" if gpu else "98,2,0", "data_cache_dir": str(work / "data-cache"),
        "seq_length": 2048 if gpu else 256, "per_device_train_batch_size": 8 if gpu else 2,
        "per_device_valid_batch_size": 8, "valid_iters": None, "max_steps": steps, "num_train_epochs": 4,
        "log_interval": 1, "num_warmup_steps": 0, "evaluate_before_training": True, "evaluation_strategy": "steps",
        "evaluation_steps": 10**6, "checkpointing_steps": 10**6, "seed": 42, "plot_curves": False,
        "padding_mode": row.padding, "attn_implementation": row.kernel, "learning_rate": 1e-4 if gpu else 1e-3,
        "distributed_strategy": row.engine or ("fsdp" if row.mode != "qlora" else "ddp"), "bf16": gpu,
    }
    if row.model in MODELS:
        path = work / "models" / f"{row.model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(MODELS[row.model]))
        values["model_config"] = str(path)
    else:
        values["model_config"] = row.model
    if row.model == "llama-1b":
        values["per_device_train_batch_size"] = 4
    if row.mode in ("lora", "qlora"):
        values.update(peft_type="lora", lora_rank=16, lora_alpha=32, learning_rate=2e-4 if gpu else 1e-2)
    if row.mode == "qlora":  # a quantized base is read from a saved model: the LoRA row's random base
        values.pop("model_config")
        values.update(quantization="nf4", pretrained_model_path=str(work / "runs" / f"{row.model}-lora-pack-sdpa"
                                                                    / "base-model"))
    return values


def run(row: Row, values: dict, work: Path, python: str, nproc: int, env: dict, timeout: float) -> dict:
    """One `mftcoder train` under torchrun; what its metrics.jsonl says."""
    out = work / "runs" / row.name
    values = {**values, "output_dir": str(out)}
    config = work / "configs" / f"{row.name}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(values, indent=1))
    log = work / "logs" / f"{row.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mftcoder",
               "train", str(config)]
    started = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = "timeout"
    result = {"rc": rc, "seconds": time.perf_counter() - started}
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    evals0 = [r for r in records if r["split"] == "eval" and r["step"] == 0]
    train = [r for r in records if r["split"] == "train" and "tokens_per_s" in r]
    result["val_loss0"] = evals0[0]["loss"] if evals0 else None
    result["train_losses"] = [r["loss"] for r in train]
    speeds = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]  # step 1 holds warm-up
    result["tokens_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else None
    memory = [r["peak_gpu_memory_gib"] for r in train if r.get("peak_gpu_memory_gib") is not None]
    result["peak_gib"] = max(memory) if memory else None
    text = log.read_text(errors="replace")
    result["notes"] = [line for line in text.splitlines() if line.startswith(("warning:", "note:"))]
    result["log_tail"] = "\n".join(text.splitlines()[-40:])
    for item in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*")]:  # checkpoints are large; logs stay
        shutil.rmtree(item, ignore_errors=True)
    return result


def body_parameters(config: dict) -> tuple[int, int]:
    """(parameters but the input embedding and output layer, all parameters) of a model config, counted on 'meta'."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    total = sum(p.numel() for p in model.parameters())
    heads = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in
             m.parameters()}
    return total - sum(heads.values()), total


def install_wheels(wheels: Path, work: Path, python: str) -> str | None:
    """Wheels into a folder of their own (no dependencies, no index); the folder, for PYTHONPATH."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return None
    target = work / "site"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                    "--disable-pip-version-check", "--target", str(target), *map(str, found)], check=True)
    return str(target)


def importable(module: str, env: dict, python: str) -> bool:
    done = subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True)
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--wheels", type=Path, default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--budget", type=float, default=450.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only the rows whose name contains this text")
    parser.add_argument("--atorch", action="store_true", help="on CPU too, the ATorch row (on a GPU: where it imports)")
    args = parser.parse_args()
    started = time.perf_counter()
    import torch
    import transformers

    gpu = torch.cuda.is_available() and not args.cpu
    steps = args.steps or (6 if gpu else 2)
    tolerance = 1e-2 if gpu else 1e-4
    work = Path(tempfile.mkdtemp(prefix="mftcoder-gpu-check-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    site = install_wheels(args.wheels, work, python) if args.wheels else None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(ROOT), env.get("PYTHONPATH")) if p)
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    kernels = ["sdpa", "flex_attention"] if gpu else []
    if gpu and importable("flash_attn", env, python):
        kernels.append("flash_attention_2")
    bnb = gpu and importable("bitsandbytes", env, python)
    atorch = importable("atorch", env, python) and (gpu or args.atorch)
    rows = [r for r in plan(gpu, kernels, bnb, atorch) if not args.only or args.only in r.name]
    if gpu:
        nproc, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        peak = next((t * 1e12 for key, t in PEAK_TFLOPS if key in name), None) or 0.0
        device = f"{nproc} x {name}, dense bf16 peak {peak / 1e12:.0f} TFLOP/s per GPU"
        total_peak = peak * nproc
    else:
        nproc, total_peak = 2, 0.0
        device = f"CPU ({os.cpu_count()} cores), 2 processes on gloo"
    header = (f"gpu_check ({'gpu' if gpu else 'cpu'}): {device}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}; flash_attn {'yes' if 'flash_attention_2' in kernels else 'not importable'}, "
              f"bitsandbytes {'yes' if bnb else 'not importable'}; {steps} steps a row")
    print(header, flush=True)
    done: dict[str, Row] = {}
    for row in rows:
        left = args.budget - (time.perf_counter() - started)
        if left < (60 if gpu else 20):
            row.result = {"rc": "skipped (budget)"}
            continue
        values = config_for(row, gpu, work, steps, nproc)
        limit = 300 if gpu else 150  # a row that runs longer hangs: a failure; one stopped by the budget is cut
        row.result = run(row, values, work, python, nproc if row.mode != "qlora" else 1, env, timeout=min(limit, left))
        if row.result["rc"] == "timeout" and left < limit:
            row.result["rc"] = "cut (budget)"
        row.result["params"] = body_parameters(MODELS[row.model]) if row.model in MODELS else None
        done[row.name] = row
        print(f"gpu_check: {row.name}: exit {row.result['rc']}, {row.result['seconds']:.0f} s", flush=True)
    return report(rows, done, header, gpu, steps, tolerance, total_peak, out, work, started)


def report(rows, done, header, gpu, steps, tolerance, total_peak, out, work, started) -> int:
    table, checks = [], []
    for row in rows:
        r = row.result
        if r.get("rc") in ("skipped (budget)", "cut (budget)"):  # not run, or stopped at the budget: no verdict
            table.append([row.model, row.mode, row.kernel, row.padding, row.engine or "fsdp"] + ["-"] * 7
                         + [r["rc"].split()[0].upper()])
            continue
        ok = r["rc"] == 0 and len(r["train_losses"]) == steps and all(math.isfinite(x) for x in r["train_losses"])
        checks.append((f"{row.name}: trains {steps} steps, finite losses", f"exit {r['rc']}, "
                       f"{len(r['train_losses'])} steps", ok))
        delta = None
        ref = done.get(row.reference) if row.reference else None
        if row.reference:
            a, b = r.get("val_loss0"), ref.result.get("val_loss0") if ref else None
            delta = abs(a - b) if a is not None and b is not None else None
            checks.append((f"{row.name}: step-0 validation loss vs {row.reference}",
                           "n/a" if delta is None else f"|d| {delta:.2e} (limit {tolerance:g})",
                           delta is not None and delta <= tolerance))
            ok = ok and delta is not None and delta <= tolerance
            if row.engine == "atorch" and ref:  # the same batches: training goes the same way
                last = (r["train_losses"] or [math.nan])[-1], (ref.result["train_losses"] or [math.nan])[-1]
                close = abs(last[0] - last[1]) <= 0.05 * abs(last[1])
                checks.append((f"{row.name}: last training loss vs {row.reference}", f"{last[0]:.5f} vs {last[1]:.5f} "
                               "(limit 5%)", close))
                ok = ok and close
        params, tps = r.get("params"), r.get("tokens_per_s")
        mfu = 6 * params[0] * tps / total_peak if params and tps and total_peak else None
        table.append([row.model, row.mode, row.kernel, row.padding,
                      row.engine or ("ddp" if row.mode == "qlora" else "fsdp"), "-" if tps is None else f"{tps:,.0f}", "-" if mfu is None else f"{100 * mfu:.1f}%",
                      "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}",
                      "-" if r.get("val_loss0") is None else f"{r['val_loss0']:.5f}",
                      "ref" if row.reference is None else ("-" if delta is None else f"{delta:.1e}"),
                      f"{r['seconds']:.0f}", str(r["rc"]), "PASS" if ok else "FAIL"])
    names = ["model", "mode", "attention", "padding", "engine", "tokens/s", "MFU", "peak GiB", "val loss @0", "|d| vs ref",
             "run s", "exit", "result"]
    widths = [max(len(str(x)) for x in column) for column in zip(names, *table)]
    lines = [header, "tokens/s: median over the steps after the first, real tokens of all processes; MFU: 6 x "
             "parameters besides the input embedding and output layer x tokens/s / dense bf16 peak (LoRA does less "
             "work than 6N; attention not counted); peak GiB: torch.cuda.max_memory_allocated of rank 0, start-up "
             "included", "  ".join(n.ljust(w) for n, w in zip(names, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in table]
    failed = [c for c in checks if not c[2]]
    lines += [""] + [f"{'PASS' if passed else 'FAIL'}  {what}: {value}" for what, value, passed in checks]
    skipped = sum(1 for row in rows if row.result.get("rc") in ("skipped (budget)", "cut (budget)"))
    lines.append(f"gpu_check: {'PASS' if not failed else f'FAIL ({len(failed)} of {len(checks)} checks)'}"
                 f"{f', {skipped} row(s) skipped or cut for time' if skipped else ''}; "
                 f"{time.perf_counter() - started:.0f} s in all")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        [{"name": row.name, **{k: v for k, v in row.result.items() if k != "log_tail"}} for row in rows], indent=1,
        default=str))
    (out / "logs.txt").write_text("\n\n".join(f"=== {row.name}\n" + "\n".join(row.result.get("notes", [])) + "\n"
                                              + row.result.get("log_tail", "") for row in rows))
    if out != work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
