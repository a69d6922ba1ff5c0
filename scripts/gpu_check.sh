#!/usr/bin/env bash
# One-shot GPU readiness check (about 8 minutes on one modern GPU, installs included).
#
#   bash scripts/gpu_check.sh [--skip-setup] [--cpu] [--keep]
#
# On a machine with a CUDA GPU: makes a venv with the CUDA build of torch==2.13.0 (from the default index;
# constraints.txt pins the same release, whose CPU wheel this project installs elsewhere) and everything else
# at constraints.txt's versions, fetches SmolLM2-135M-Instruct (scripts/get_smollm2.py), writes the config of
# a ~1B-parameter random-initialised Llama, and trains each model for a few steps with `mftcoder train` under
# torchrun (one process per visible GPU, distributed_strategy: fsdp, bf16, padding_mode: pack), once per
# installed attention kernel (sdpa, eager, flex_attention, and flash_attention_2 where `import flash_attn`
# works), plus one padding_mode: dynamic run per model. It prints tokens/s, MFU, peak GPU memory and the
# step-0 validation loss of each run, checks that every packed run's step-0 validation loss equals the
# dynamic (unpacked) run's within 1e-2 (bf16), prints a table and exits non-zero if any check failed.
#
# Without a GPU (or with --cpu) the same checks run on the shipped tiny model (model_config: tiny-test) for
# 3 steps under torchrun with 2 processes (FSDP2 on gloo, fp32), sdpa and eager, tolerance 1e-4 (~1 minute
# on 2 cores; MFU there is against a measured fp32 matmul).
#
# --skip-setup (or MFTCODER_SKIP_SETUP=1): no venv, no installs: use $MFTCODER_PYTHON, else ./.venv/bin/python.
# --keep: keep the work folder (configs, logs, metrics.jsonl of every run); checkpoints are always deleted.
# Environment: GPU_CHECK_STEPS (optimizer steps per run; 8 on GPU, 3 on CPU), GPU_CHECK_WORKDIR (work folder),
# GPU_CHECK_VENV (GPU venv; default $TMPDIR/mftcoder-gpu-venv, reused when its torch sees the GPU),
# GPU_CHECK_TORCH_INDEX_URL (an index to take the CUDA torch from, if the default one does not give it),
# GPU_CHECK_ATTN (a comma list to run only some attention kernels, e.g. sdpa,flex_attention).
# ATorch: on GPU (or with GPU_CHECK_ATORCH=1 on CPU), where `import atorch` works (the GPU venv installs it), one more
# run per model with distributed_strategy: atorch and its default strategy (GPU: parallel_mode, fsdp, bf16
# amp_native, checkpoint), checked against the dynamic fsdp run: finite losses, the same step-0 validation loss
# (tolerance as above), and a last training loss within 5%. GPU_CHECK_ATORCH=0 leaves it out.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
started=$(date +%s)
skip_setup="${MFTCODER_SKIP_SETUP:-0}"
force_cpu=0
keep=0
for arg in "$@"; do
  case "$arg" in
    --skip-setup) skip_setup=1 ;;
    --cpu) force_cpu=1 ;;
    --keep) keep=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

mode=cpu
if [ "$force_cpu" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  mode=gpu
fi
echo "gpu_check: mode $mode"

pipq=(--quiet --disable-pip-version-check)
if [ "$skip_setup" = 1 ]; then
  PY="${MFTCODER_PYTHON:-$ROOT/.venv/bin/python}"
elif [ "$mode" = gpu ]; then
  venv="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/mftcoder-gpu-venv}"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, mftcoder, gguf; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check: reusing $venv"
  else
    echo "gpu_check: setting up $venv (CUDA torch==2.13.0, the rest at constraints.txt's versions)"
    python3 -m venv "$venv"
    torch_index=()
    [ -n "${GPU_CHECK_TORCH_INDEX_URL:-}" ] && torch_index=(--index-url "$GPU_CHECK_TORCH_INDEX_URL")
    "$venv/bin/pip" install "${pipq[@]}" "${torch_index[@]}" "torch==2.13.0"
    if ! "$venv/bin/python" -c "import torch; assert torch.version.cuda and torch.cuda.is_available(), torch.__version__"; then
      echo "gpu_check: the torch installed in $venv cannot use the GPU (a CPU build, or a CUDA build the driver" \
           "refuses); set GPU_CHECK_TORCH_INDEX_URL to an index with a CUDA build of torch 2.13.0" >&2
      exit 1
    fi
    # The CPU build's pin stays out: pip keeps the CUDA torch that is installed.
    grep -v '^torch==' constraints.txt > "$venv/constraints-gpu.txt"
    "$venv/bin/pip" install "${pipq[@]}" -c "$venv/constraints-gpu.txt" -e ".[assets,atorch]"
  fi
  PY="$venv/bin/python"
else
  echo "gpu_check: setting up .venv (scripts/setup.sh)"
  bash scripts/setup.sh
  PY="$ROOT/.venv/bin/python"
fi
echo "gpu_check: python $PY (setup took $(( $(date +%s) - started )) s)"

workdir="${GPU_CHECK_WORKDIR:-}"
if [ -z "$workdir" ]; then
  workdir="$(mktemp -d "${TMPDIR:-/tmp}/mftcoder-gpu-check.XXXXXX")"
  [ "$keep" = 1 ] || trap 'rm -rf "$workdir"' EXIT
fi
mkdir -p "$workdir"
cat > "$workdir/gpu_check.py" <<'PYTHON'
"""The runs, the measurements and the table of scripts/gpu_check.sh (written out and run by it)."""
import json, math, os, shutil, signal, statistics, subprocess, sys, time
from pathlib import Path

mode, root, work, python = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
gpu = mode == "gpu"
steps = int(os.environ.get("GPU_CHECK_STEPS") or (8 if gpu else 3))
tolerance = 1e-2 if gpu else 1e-4
run_timeout = 420 if gpu else 150
import torch  # noqa: E402

# bf16 dense tensor-core peak (no sparsity) by device name, TFLOP/s; other devices: a measured matmul.
# First match wins (so "L40S" before "L40" before "L4").
PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989), ("B200", 2250),
               ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121)]


def measured_peak(device: str, dtype) -> float:
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    reps, t0 = (20 if device == "cuda" else 10), None
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


if gpu:
    nproc = torch.cuda.device_count()
    if nproc == 0:
        sys.exit(f"gpu_check: nvidia-smi lists a GPU but {python}'s torch {torch.__version__} sees none "
                 "(a CPU build?); run without --skip-setup, or point MFTCODER_PYTHON at a CUDA venv")
    name = torch.cuda.get_device_name(0)
    peak = next((t * 1e12 for key, t in PEAK_TFLOPS if key in name), None)
    peak_source = "table"
    if peak is None:
        peak, peak_source = measured_peak("cuda", torch.bfloat16), "measured bf16 matmul"
        torch.cuda.empty_cache()  # the runs get the whole GPU
    device_line = (f"{nproc} x {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                   f"peak {peak / 1e12:.0f} TFLOP/s per GPU ({peak_source})")
    total_peak = peak * nproc
else:
    nproc = 2
    peak = measured_peak("cpu", torch.float32)
    total_peak = peak  # both processes share this machine's cores
    device_line = (f"CPU ({os.cpu_count()} cores), 2 processes, torch {torch.__version__}, "
                   f"peak {peak / 1e9:.1f} GFLOP/s for the whole machine (measured fp32 matmul)")
strategy = "fsdp" if nproc > 1 else "none(1proc)"  # mftcoder shards only across 2+ processes

attns = ["sdpa", "eager"]
if gpu:
    import importlib.util
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        attns.append("flex_attention")
    try:
        import flash_attn  # noqa: F401
        attns.append("flash_attention_2")
    except Exception:
        pass
import importlib.util  # noqa: E402
atorch_leg = (importlib.util.find_spec("atorch") is not None and os.environ.get("GPU_CHECK_ATORCH") != "0"
              and (gpu or os.environ.get("GPU_CHECK_ATORCH") == "1"))
if os.environ.get("GPU_CHECK_ATTN"):  # e.g. GPU_CHECK_ATTN=sdpa,flex_attention to save time
    attns = [a for a in attns if a in os.environ["GPU_CHECK_ATTN"].split(",")]

demo = root / "mftcoder" / "assets" / "demo_data"
common = {
    "data_paths": [str(demo / t) for t in ("code_generation", "code_docstring", "code_multiturn")],
    # the validation split: 45 samples on GPU; 18 on CPU, where evaluating it is most of a run's time
    "data_split": "95,5,0" if gpu else "98,2,0", "data_cache_dir": str(work / "data-cache"),
    "seq_length": 2048 if gpu else 256, "per_device_train_batch_size": 8 if gpu else 2,  # rows per process
    "per_device_valid_batch_size": 8, "valid_iters": None,  # the whole validation split: pack and dynamic see the same
    "max_steps": steps, "num_train_epochs": max(2, steps * nproc), "log_interval": 1, "num_warmup_steps": 0,
    "evaluate_before_training": True, "evaluation_strategy": "steps", "evaluation_steps": 10**6,
    "checkpointing_steps": 10**6, "distributed_strategy": "fsdp", "bf16": gpu, "seed": 42,
}


def body_params(source: dict) -> tuple[int, int]:
    """(parameters without the input embedding and output layer, all parameters): a model built on 'meta'."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from mftcoder.model import read_model_config
    if "pretrained_model_path" in source:
        config = AutoConfig.from_pretrained(source["pretrained_model_path"])
    else:
        config = AutoConfig.for_model(**read_model_config(source["model_config"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}
    total = sum(params.values())
    embeddings = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None for p in m.parameters()}
    return total - sum(embeddings.values()), total


def llama_1b() -> dict:
    """A Llama-shaped ~1B model (TinyLlama's width, 18 layers; the shipped tokenizer's 50,304-row vocabulary)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 50304, "max_position_embeddings": 4096,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "initializer_range": 0.02}
    path = work / "llama-1b" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return {"model_config": str(path), "save_dtype": "bfloat16"}


def run_train(name: str, values: dict) -> dict:
    """One `mftcoder train` under torchrun; returns what its metrics.jsonl says."""
    out = work / "runs" / name
    values = {**values, "output_dir": str(out)}
    config_path = work / "configs" / f"{name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(values, indent=1))
    command = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mftcoder", "train", str(config_path)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=root, env=env,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = "timeout"
    result = {"name": name, "rc": rc, "seconds": time.perf_counter() - t0, "log": log}
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    evals0 = [r for r in records if r["split"] == "eval" and r["step"] == 0]
    train = [r for r in records if r["split"] == "train" and "tokens_per_s" in r]
    result["val_loss0"] = evals0[0]["loss"] if evals0 else None
    result["train_losses"] = [r["loss"] for r in train]
    skip = 2 if len(train) >= 6 else 1  # the first interval holds start-up, the step-0 evaluation and warm-up
    speeds = [r["tokens_per_s"] for r in train[skip:]] or [r["tokens_per_s"] for r in train]
    result["tokens_per_s"] = statistics.median(speeds) if speeds else None
    memory = [r["peak_gpu_memory_gib"] for r in train if r.get("peak_gpu_memory_gib") is not None]
    result["peak_gib"] = max(memory) if memory else None
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print(f"--- {name}: exit {rc}; last lines of {log}:\n" + "\n".join(tail), flush=True)
    # Checkpoints are large (a 1B model with its optimizer state is ~13 GB): only the logs stay.
    for item in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*"), out / "base-model"]:
        shutil.rmtree(item, ignore_errors=True)
    print(f"gpu_check: {name}: exit {rc}, {result['seconds']:.0f} s", flush=True)
    return result


models = []
if gpu:
    smollm2 = root / "models" / "SmolLM2-135M-Instruct"
    if not (smollm2 / "config.json").is_file():
        print("gpu_check: fetching SmolLM2-135M-Instruct (scripts/get_smollm2.py)", flush=True)
        subprocess.run([python, str(root / "scripts" / "get_smollm2.py"), "--no-check"], cwd=root)
    models.append(("smollm2-135m", {"pretrained_model_path": str(smollm2), "chat_template": "model",
                                    "learning_rate": 2e-5}, (smollm2 / "config.json").is_file()))
    # 4 rows of 2048 per GPU: eager attention keeps every layer's scores, which 8 rows would make ~40 GB
    models.append(("llama-1b", {**llama_1b(), "learning_rate": 1e-4, "per_device_train_batch_size": 4}, True))
else:
    models.append(("tiny-test", {"model_config": "tiny-test", "learning_rate": 1e-3}, True))

rows, checks = [], []  # checks: (what, value, limit, passed)
for model_name, source, available in models:
    if not available:
        checks.append((f"{model_name}: model available", "missing", "", False))
        continue
    body, total = body_params(source)
    if model_name == "llama-1b":
        checks.append(("llama-1b: parameter count", f"{total / 1e9:.3f}B", "1.0-1.1B", 1.0e9 <= total <= 1.1e9))
    reference = run_train(f"{model_name}-dynamic-sdpa", {**common, **source, "padding_mode": "dynamic",
                                                         "attn_implementation": "sdpa"})
    runs = [("dynamic", "sdpa", reference)]
    if atorch_leg:  # ATorch's default strategy for this device, on the reference's batches
        engine = run_train(f"{model_name}-atorch-sdpa", {**common, **source, "padding_mode": "dynamic",
                                                         "attn_implementation": "sdpa", "distributed_strategy": "atorch"})
        a, b = engine["val_loss0"], reference["val_loss0"]
        checks.append((f"{model_name} atorch vs fsdp: step-0 val loss", "n/a" if None in (a, b) else f"|d| {abs(a - b):.2e}",
                       f"{tolerance:g}", None not in (a, b) and abs(a - b) <= tolerance))
        last = (engine["train_losses"] or [None])[-1], (reference["train_losses"] or [None])[-1]
        checks.append((f"{model_name} atorch vs fsdp: last train loss", "n/a" if None in last else
                       f"{last[0]:.5f} vs {last[1]:.5f}", "5%",
                       None not in last and abs(last[0] - last[1]) <= 0.05 * abs(last[1])))
        runs.append(("dynamic", "sdpa", {**engine, "strategy": "atorch"}))
    for attn in attns:
        runs.append(("pack", attn, run_train(f"{model_name}-pack-{attn}", {**common, **source, "padding_mode": "pack",
                                                                          "attn_implementation": attn})))
    for padding, attn, r in runs:
        ok = r["rc"] == 0 and r["tokens_per_s"] is not None and len(r["train_losses"]) == steps and all(
            x is not None and math.isfinite(x) for x in r["train_losses"])
        label = f"{model_name} {padding} {attn}" + (" atorch" if "strategy" in r else "")
        checks.append((f"{label}: trains {steps} steps (finite losses)",
                       f"exit {r['rc']}, {len(r['train_losses'])} steps", "", ok))
        delta = None
        if padding == "pack":
            a, b = r["val_loss0"], reference["val_loss0"]
            delta = abs(a - b) if a is not None and b is not None else None
            checks.append((f"{model_name} pack {attn} vs dynamic sdpa: step-0 val loss",
                           "n/a" if delta is None else f"|d| {delta:.2e}", f"{tolerance:g}",
                           delta is not None and delta <= tolerance))
        tps = r["tokens_per_s"]
        mfu = 6 * body * tps / total_peak if tps else None
        shape = f"{source.get('per_device_train_batch_size', common['per_device_train_batch_size'])}x{common['seq_length']}"
        rows.append([model_name, f"{body / 1e6:.1f}M/{total / 1e6:.1f}M", attn, padding, r.get("strategy", strategy), shape,
                     "-" if tps is None else f"{tps:,.0f}", "-" if mfu is None else f"{100 * mfu:.1f}%",
                     "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                     "-" if r["val_loss0"] is None else f"{r['val_loss0']:.5f}",
                     "ref" if padding == "dynamic" and "strategy" not in r else ("-" if delta is None else f"{delta:.1e}"),
                     f"{r['seconds']:.0f}",
                     "PASS" if ok and (padding == "dynamic" or (delta is not None and delta <= tolerance)) else "FAIL"])

header = ["model", "params body/all", "attention", "padding", "strategy", "rows x seq", "tokens/s", "MFU",
          "peak GiB", "val loss @0", "|d| vs dyn", "run s", "result"]
widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
print()
print(f"gpu_check ({mode}): {device_line}")
print(f"runs: {steps} optimizer steps each (rows x seq per process), {nproc} process(es) under torchrun, "
      f"{'bf16 autocast (fp32 master weights)' if gpu else 'fp32'}; tokens/s: median over the steps after warm-up, "
      "real (non-pad) tokens of all processes; run s: the whole run, start-up and final checkpoint included")
print("MFU = 6 x (body parameters: all but the input embedding and output layer) x tokens/s / peak"
      f"{' x GPUs' if gpu else ''} (attention scores and the output layer not counted); "
      "peak GiB: torch.cuda.max_memory_allocated of rank 0")
print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
print("  ".join("-" * w for w in widths))
for row in rows:
    print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
print()
failed = [c for c in checks if not c[3]]
for what, value, limit, passed in checks:
    print(f"{'PASS' if passed else 'FAIL'}  {what}: {value}" + (f" (limit {limit})" if limit else ""))
equal = [c for c in checks if "vs dynamic" in c[0]]
print(f"packed == unpacked (step-0 validation loss, tolerance {tolerance:g}): "
      f"{'passed' if equal and all(c[3] for c in equal) else 'FAILED'}")
print(f"gpu_check: {'PASS' if not failed else f'FAIL ({len(failed)} of {len(checks)} checks)'}")
sys.exit(1 if failed else 0)
PYTHON
status=0
"$PY" "$workdir/gpu_check.py" "$mode" "$ROOT" "$workdir" "$PY" || status=$?
[ "$keep" = 1 ] && echo "gpu_check: work folder kept: $workdir"
echo "gpu_check: $(( $(date +%s) - started )) s in all"
exit "$status"
