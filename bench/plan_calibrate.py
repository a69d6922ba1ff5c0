#!/usr/bin/env python
"""The constants of `mftcoder plan`'s CPU time model that are counted or measured once rather than at plan time.

    python bench/plan_calibrate.py ops     # operators and elementwise bytes per decoder layer and token (seconds)
    python bench/plan_calibrate.py gloo    # gloo's all-gather / reduce-scatter bandwidth, 2 local ranks (seconds)
    python bench/plan_calibrate.py rates   # the rates plan measures at a model's shapes (tiny-test and SmolLM2)

`ops` runs one forward and backward pass of two-layer Llama and GPT-NeoX decoders under a dispatch mode and counts,
per decoder layer, the aten operators and the bytes read and written by those that are not matmuls or attention
(every tensor argument and result, at its own size), at two MLP widths, so that bytes per token and layer come out as
a x hidden + b x intermediate (mftcoder/plan/timing.py: ELEMENTWISE_*, OPS_PER_LAYER).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}


def count_layer_ops(layout: str, hidden: int, intermediate: int, lora: bool, tokens: int = 256) -> tuple[float, float]:
    """(operators, elementwise bytes per token) of one decoder layer's forward and backward, float32, packed rows."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoConfig, AutoModelForCausalLM

    def run(layers: int) -> tuple[int, int]:
        if layout == "gated":
            raw = dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)
        else:
            raw = dict(model_type="gpt_neox", hidden_size=hidden, intermediate_size=intermediate,
                       num_attention_heads=4, vocab_size=256, rotary_pct=0.25, use_parallel_residual=True)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw, num_hidden_layers=layers),
                                                 attn_implementation="sdpa")
        if lora:
            model.requires_grad_(False)
        body = model.base_model
        hidden_in = torch.randn(1, tokens, hidden, requires_grad=True)
        positions = torch.cat([torch.arange(tokens // 2), torch.arange(tokens - tokens // 2)])[None]
        counts = [0, 0]

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                counts[0] += 1
                if name not in MATMULS and "attention" not in name and not func.is_view:
                    flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
                    counts[1] += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
                return out

        with Count():
            out = body(inputs_embeds=hidden_in, position_ids=positions, use_cache=False).last_hidden_state
            out.sum().backward()
        return counts[0], counts[1]

    one, two = run(1), run(2)
    return two[0] - one[0], (two[1] - one[1]) / tokens


def cmd_ops() -> None:
    """Per layer: operators, and elementwise bytes per token fitted as a x hidden + b x intermediate + c x row length
    (the last: the block-diagonal mask's per-layer copy, one byte per element, counted in bytes)."""
    for layout in ("gated", "neox"):
        for lora in (False, True):
            h, i, t = 128, 256, 256
            ops, base = count_layer_ops(layout, h, i, lora, t)
            _, wide = count_layer_ops(layout, h, 2 * i, lora, t)
            _, long = count_layer_ops(layout, h, i, lora, 2 * t)
            per_i = (wide - base) / i / 4
            per_t = (long - base) / t  # bytes
            per_h = (base - per_i * i * 4 - per_t * t) / h / 4
            print(f"{layout} {'frozen' if lora else 'full'}: {ops} operators per layer (forward + backward); "
                  f"per token and layer: {per_h:.1f} x hidden + {per_i:.1f} x intermediate float32 elements + "
                  f"{per_t:.2f} x row length bytes")


def gloo_worker() -> None:
    """One rank: time all_gather_into_tensor and reduce_scatter_tensor of 64 MiB, report bytes received per second."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world, size = dist.get_world_size(), 16 * 2**20
    shard = torch.randn(size // world)
    full = torch.empty(size)
    results = {}
    for name, op in (("all_gather", lambda: dist.all_gather_into_tensor(full, shard)),
                     ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, full))):
        op()
        dist.barrier()
        started, count = time.perf_counter(), 0
        while time.perf_counter() - started < 1.0:
            op()
            count += 1
        seconds = (time.perf_counter() - started) / count
        results[name] = size * 4 * (world - 1) / world / seconds
    if dist.get_rank() == 0:
        print(json.dumps({f"{k}_bytes_per_s": v for k, v in results.items()}))
    dist.destroy_process_group()


def cmd_gloo() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__, "gloo-worker"]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def cmd_rates() -> None:
    """The rates plan measures, at the shapes of tiny-test and SmolLM2-135M with passes of 1024 tokens (measured
    now, not read from the rates file)."""
    from mftcoder.plan.rates import measure_cpu_rates_now

    for name, (h, i, heads, hd, vocab, row) in {"tiny-test": (128, 512, 4, 32, 50304, 256),
                                                "SmolLM2-135M": (576, 1536, 9, 64, 49152, 512)}.items():
        started = time.perf_counter()
        rates = measure_cpu_rates_now(1024, h, i, heads, hd, vocab, row)
        print(f"{name} ({time.perf_counter() - started:.2f} s to measure): {rates.describe()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("ops", "gloo", "rates", "gloo-worker"))
    what = parser.parse_args().what
    {"ops": cmd_ops, "gloo": cmd_gloo, "rates": cmd_rates, "gloo-worker": gloo_worker}[what]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
