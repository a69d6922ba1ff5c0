"""FSDP2 with gradient accumulation: reduce-scatter every pass (fsdp_gradient_sync: every_pass) against accumulating
unsharded gradients and reducing once per step (step). 2 ranks on CPU (torchrun, gloo), a Llama-shaped model, one
optimizer step of --passes forward/backward passes; both modes alternate in the same processes.

    .venv/bin/python bench/fsdp_grad_sync.py [--passes 4] [--repeats 3]

Per mode and rank: the peak bytes of tensors on the training device during the step (mftcoder.train.memory_meter:
weights' shards, gradients, activations, buffers), the step time (median of --repeats after one warm-up), and the bytes
each rank sends into reduce-scatters (counted: float32 gradients, one full-size input per reduction).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False)


def worker(args) -> None:
    import contextlib

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mftcoder.data.batching import collate
    from mftcoder.loss import StepCounts, SupervisedLM, TaskTotals
    from mftcoder.train.distributed import FullyShard, OptimizerSpec, init_distributed, shutdown
    from mftcoder.train.loop import accumulate_gradients
    from mftcoder.train.memory_meter import TensorBytes

    env = init_distributed()
    rng = np.random.default_rng(env.rank)
    batches = [collate([[(rng.integers(0, 8192, 256).astype(np.int32), np.ones(256, dtype=np.uint8), 0)]
                        for _ in range(2)], 0) for _ in range(args.passes)]
    counts = StepCounts.of(batches, 1)
    counts = StepCounts(*env.all_reduce_sum(torch.stack([counts.tokens, counts.samples])))
    report = {}
    for repeat in range(args.repeats + 1):
        for mode in ("every_pass", "step"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPE), attn_implementation="sdpa")
            parallel = FullyShard(env, reduce_every_pass=mode == "every_pass")
            runner, optimizer = parallel.prepare(SupervisedLM(model), model, OptimizerSpec(0.0, {"lr": 1e-4}))
            shards = sum(p.to_local().numel() * 4 for p in model.parameters())
            env.barrier()
            started = time.perf_counter()
            with TensorBytes(env.device, shards) as meter:
                accumulate_gradients(runner, batches, counts, "case1", torch.ones(1), parallel, TaskTotals.zeros(1),
                                     contextlib.nullcontext())
            env.barrier()
            seconds = time.perf_counter() - started
            params = sum(p.numel() for p in model.parameters())
            reductions = args.passes if mode == "every_pass" else 1
            entry = report.setdefault(mode, {"peak_mb": meter.peak / 2**20, "seconds": [],
                                             "reduce_scatter_mb_sent": reductions * params * 4 / 2**20,
                                             "shards_mb": shards / 2**20, "params": params})
            if repeat:  # the first round warms up
                entry["seconds"].append(seconds)
            del runner, optimizer, model
    for entry in report.values():
        entry["seconds"] = statistics.median(entry["seconds"])
    Path(args.out, f"rank-{env.rank}.json").write_text(json.dumps(report))
    shutdown(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/mftcoder-fsdp-grad-sync")
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                    "--worker", "--passes", str(args.passes), "--repeats", str(args.repeats), "--out", args.out],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads(Path(args.out, f"rank-{r}.json").read_text()) for r in (0, 1)]
    print(f"{ranks[0]['step']['params'] / 1e6:.1f}M parameters, 2 ranks, {args.passes} passes of 2 x 256 tokens per "
          "optimizer step")
    print("mode        peak MB (rank 0/1)   step s (rank 0)   reduce-scatter MB sent per rank")
    for mode in ("every_pass", "step"):
        peaks = "/".join(f"{r[mode]['peak_mb']:.0f}" for r in ranks)
        print(f"{mode:<11} {peaks:<20} {ranks[0][mode]['seconds']:<17.3f} {ranks[0][mode]['reduce_scatter_mb_sent']:.0f}")


if __name__ == "__main__":
    main()
