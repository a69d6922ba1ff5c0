"""Peak host memory of FSDP2 start-up on CPU: 2 ranks (torchrun, gloo) start mftcoder's trainer on a 411M-parameter
Llama-shaped model with distributed_strategy: fsdp and run a couple of tiny training steps; each rank reports its
peak RSS.

    .venv/bin/python bench/fsdp_load_memory.py [--work DIR] [--steps 2] [--full] [--disk-dtype bfloat16]
                                               [--random-init] [--every-rank-loads]

The model (random weights, saved once with save_pretrained) and the tokenized demo data are kept under --work
(default /tmp/mftcoder-fsdp-mem). Per rank it reports VmHWM (peak resident set, file-backed pages included) and
the peak of RssAnon (anonymous memory only; sampled every 20 ms), after set-up (load + LoRA + start-up checks +
fully_shard and the fill) and after the training steps. No checkpoint is written: set-up and training only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=2816, vocab_size=50304, tie_word_embeddings=False, max_position_embeddings=2048)
# vocab 50304 (not 32000): the shipped GPT-NeoX tokenizer (50279 tokens) must fit the embedding.


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmHWM, VmRSS, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonPeak:
    """Samples RssAnon in a background thread; `.peak_kb` is the largest value seen."""

    def __init__(self, interval: float = 0.02):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb("RssAnon"))
            time.sleep(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, proc_status_kb("RssAnon"))
        return self.peak_kb


def make_model(directory: Path, dtype: str) -> int:
    """The random Llama-shaped model saved as `dtype` safetensors (once); returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32)
        model.to(getattr(torch, dtype)).save_pretrained(directory)
        del model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(p.numel() for p in model.parameters())


def bench_config(args: argparse.Namespace):
    """The run: demo data, seq 128, batch 1, FSDP, LoRA unless --full; the saved model or its config (--random-init)."""
    from mftcoder.config import build_config
    from mftcoder.model import DEMO_DATA, SHIPPED_TOKENIZER

    work = Path(args.work)
    model_dir = work / f"model-{args.disk_dtype}"
    model = {"model_config": str(model_dir / "config.json")} if args.random_init else \
        {"pretrained_model_path": str(model_dir)}
    values = {"data_paths": [str(p) for p in sorted(DEMO_DATA.iterdir()) if p.is_dir()],
              "data_cache_dir": str(work / "cache"), **model,
              "tokenizer_path": str(SHIPPED_TOKENIZER), "output_dir": str(work / "run"), "seq_length": 128,
              "per_device_train_batch_size": 1, "max_steps": args.steps, "evaluation_strategy": "no",
              "distributed_strategy": "fsdp", "learning_rate": 1e-4, "log_interval": 1,
              **({} if args.full else {"peft_type": "lora"})}
    return build_config(values)[0]


def use_every_rank_loading() -> None:
    """The start-up before low-memory loading, for comparison: every rank builds (and checks) the whole model."""
    import mftcoder.train.model_setup as model_setup
    from mftcoder.train.sharded_load import RankZeroLoad

    class EveryRankLoads(RankZeroLoad):
        def __init__(self, env, sharded: bool):
            super().__init__(env, sharded=False)

    model_setup.RankZeroLoad = EveryRankLoads


def worker(args: argparse.Namespace) -> None:
    """One rank: the trainer's set-up, then `--steps` optimizer steps; writes rank-N.json to --work."""
    from mftcoder.train.distributed import init_distributed, shutdown
    from mftcoder.train.loop import Trainer

    sampler = AnonPeak()
    work = Path(args.work)
    if args.every_rank_loads:
        use_every_rank_loading()
    config = bench_config(args)
    env = init_distributed()
    baseline = {"anon_mb": proc_status_kb("RssAnon") / 1024, "vm_hwm_mb": proc_status_kb("VmHWM") / 1024}
    started = time.perf_counter()
    trainer = Trainer(config, env)
    setup = {"seconds": time.perf_counter() - started, "vm_hwm_mb": proc_status_kb("VmHWM") / 1024,
             "anon_peak_mb": sampler.peak_kb / 1024, "rss_mb": proc_status_kb("VmRSS") / 1024}
    losses, after_steps = [], []
    for batches in trainer._prefetch(trainer._epoch_steps(0)[:args.steps]):
        losses.append(trainer.train_step(batches))
        after_steps.append({"anon_mb": proc_status_kb("RssAnon") / 1024, "anon_peak_mb": sampler.peak_kb / 1024})
    anon = sampler.stop()
    report = {"rank": env.rank, "baseline": baseline, "setup": setup, "losses": losses, "after_steps": after_steps,
              "total": {"seconds": time.perf_counter() - started, "vm_hwm_mb": proc_status_kb("VmHWM") / 1024,
                        "anon_peak_mb": anon / 1024}}
    (work / f"rank-{env.rank}.json").write_text(json.dumps(report, indent=1))
    del trainer
    shutdown(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/mftcoder-fsdp-mem")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--disk-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the weights on disk (training loads them in float32 on CPU)")
    parser.add_argument("--random-init", action="store_true",
                        help="model_config (random init, seeded, on rank 0) instead of loading the saved weights")
    parser.add_argument("--every-rank-loads", action="store_true",
                        help="the start-up before low-memory loading, for comparison: every rank builds the model")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    params = make_model(work / f"model-{args.disk_dtype}", args.disk_dtype)
    for old in work.glob("rank-*.json"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--work", str(work), "--steps", str(args.steps), "--disk-dtype", args.disk_dtype,
               *[f"--{flag.replace('_', '-')}" for flag in ("full", "random_init", "every_rank_loads")
                 if getattr(args, flag)]]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((work / f"rank-{r}.json").read_text()) for r in range(2)]
    size_mb = params * 4 / 2**20
    print(f"\nmodel: {params / 1e6:.0f}M parameters, {size_mb:.0f} MB in fp32; {'full' if args.full else 'LoRA'}, "
          f"{args.steps} steps, seq 128, batch 1, "
          f"{'random init' if args.random_init else args.disk_dtype + ' on disk'}, "
          f"{'every rank builds the model' if args.every_rank_loads else 'rank 0 loads, the others get their shards'}")
    print("| | rank 0 | rank 1 | sum |\n|---|---:|---:|---:|")
    for phase, label in (("setup", "set-up"), ("total", "set-up + steps")):
        for key, what in (("vm_hwm_mb", "peak RSS (VmHWM), MB"), ("anon_peak_mb", "peak RssAnon, MB")):
            values = [r[phase][key] for r in ranks]
            print(f"| {label}: {what} | {values[0]:.0f} | {values[1]:.0f} | {sum(values):.0f} |")
    base = [r["baseline"]["anon_mb"] for r in ranks]
    print(f"| before set-up (imports, process group): RssAnon, MB | {base[0]:.0f} | {base[1]:.0f} | {sum(base):.0f} |")
    print(f"| set-up seconds | {ranks[0]['setup']['seconds']:.1f} | {ranks[1]['setup']['seconds']:.1f} | |")
    print(f"losses: {ranks[0]['losses']}")
    for rank in ranks:
        print(f"rank {rank['rank']}: RssAnon after each step (now / peak so far), MB: "
              + ", ".join(f"{s['anon_mb']:.0f} / {s['anon_peak_mb']:.0f}" for s in rank["after_steps"]))


if __name__ == "__main__":
    main()
