"""What this CPU does per second at a model's own shapes: the rates the CPU step-time terms divide by. Each is
measured in a few tens of milliseconds when a plan is made, with the thread count a rank trains with, and cached per
process (functools.lru_cache on pure measuring functions of the shapes: the same shapes are measured once)."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

# gloo's bytes received per second per rank in all-gather / reduce-scatter of 64 MiB between 2 local ranks: not
# measured when a plan is made (that needs 2 processes). `bench/plan_calibrate.py gloo` measured 0.29 GB/s all-gather
# and 0.19 GB/s reduce-scatter on the 2-core development machine while another benchmark kept both cores busy (so
# low); the lead recalibrates on an idle machine.
GLOO_BYTES_PER_S = 0.25e9
MEASURE_SECONDS = 0.04  # per rate: enough calls of a kernel to average a few, well under the second a plan takes
MAX_MEASURED_TOKENS = 512  # matmul rates at the model's widths are flat from here up (within 3% at 1024 tokens)


@dataclass(frozen=True)
class CpuRates:
    """Measured rates: FLOP/s of the decoder's linears (forward + backward, with and without weight gradients), of the
    output layer's, of attention; logits per second through the fused head's softmax steps; bytes per second of
    elementwise kernels at activation size and at weight size; seconds per small operator; nf4 weights dequantized
    per second (QLoRA only); gloo bytes per second (a documented constant)."""

    linear_flops: float
    frozen_linear_flops: float
    head_flops: float
    frozen_head_flops: float
    attention_flops: float
    softmax_logits: float
    activation_bandwidth: float
    weight_bandwidth: float
    op_seconds: float
    dequantize_weights: float | None
    gloo_bytes: float = GLOO_BYTES_PER_S
    threads: int = 1

    def describe(self) -> str:
        """The rates in one line, in GFLOP/s, G logits/s, GB/s and microseconds."""
        g = 1e9
        text = (f"{self.threads} thread(s); linears {self.linear_flops / g:.0f} GFLOP/s (frozen "
                f"{self.frozen_linear_flops / g:.0f}), output layer {self.head_flops / g:.0f} ({self.frozen_head_flops / g:.0f}), "
                f"attention {self.attention_flops / g:.0f}; softmax {self.softmax_logits / g:.2f} G logits/s; "
                f"bandwidth {self.activation_bandwidth / g:.1f} GB/s (activations), {self.weight_bandwidth / g:.1f} "
                f"(weights); {self.op_seconds * 1e6:.1f} us per operator")
        if self.dequantize_weights:
            text += f"; nf4 dequantization {self.dequantize_weights / g:.2f} G weights/s"
        return text + f"; gloo {self.gloo_bytes / g:.1f} GB/s (constant)"


def seconds_per_call(call: Callable[[], object], seconds: float = MEASURE_SECONDS, least: int = 2) -> float:
    """Wall seconds per call of `call`: one warm-up call, then calls until `seconds` passed (at least `least`)."""
    call()
    started, count = time.perf_counter(), 0
    while count < least or time.perf_counter() - started < seconds:
        call()
        count += 1
    return (time.perf_counter() - started) / count


@functools.lru_cache(maxsize=None)
def linear_rate(tokens: int, fan_in: int, fan_out: int, weight_grad: bool) -> float:
    """FLOP/s of a float32 linear's forward and backward: 2 m k n forward, as much for the input's gradient and (when
    the weight trains) as much again for the weight's."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(tokens, fan_in, requires_grad=True)
    w = torch.randn(fan_out, fan_in, requires_grad=weight_grad)
    grad = torch.randn(tokens, fan_out)

    def step() -> None:
        x.grad = w.grad = None
        F.linear(x, w).backward(grad)

    return (3 if weight_grad else 2) * 2.0 * tokens * fan_in * fan_out / seconds_per_call(step)


@functools.lru_cache(maxsize=None)
def attention_rate(row_tokens: int, heads: int, head_dim: int) -> float:
    """FLOP/s of SDPA's forward and backward on one row with a boolean mask, counted as 3 x the forward's 4 n^2 d per
    head: with a mask (the block-diagonal one of packed rows) CPU SDPA computes every row x row score, skipping
    none of the masked ones, so this holds for any mask."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, heads, row_tokens, head_dim, requires_grad=True) for _ in range(3))
    mask = torch.ones(row_tokens, row_tokens, dtype=torch.bool).tril()

    def step() -> None:
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    return 3 * 4.0 * row_tokens ** 2 * heads * head_dim / seconds_per_call(step)


@functools.lru_cache(maxsize=None)
def softmax_rate(chunk: int, vocab: int) -> float:
    """Logits per second through the fused output layer's elementwise steps on a float32 chunk (loss.py: logsumexp,
    subtract it and exponentiate in place, subtract one at the targets, scale by the tokens' coefficients)."""
    import torch

    logits = torch.randn(chunk, vocab)
    coefficients = torch.rand(chunk, 1)
    targets = torch.randint(0, vocab, (chunk,))
    rows = torch.arange(chunk)

    def step() -> None:
        norm = torch.logsumexp(logits, dim=1)
        logits.sub_(norm[:, None]).exp_()
        logits[rows, targets] -= 1.0
        logits.mul_(coefficients)  # the result lies in [-1, 1]: repeated calls stay finite

    return chunk * vocab / seconds_per_call(step)


@functools.lru_cache(maxsize=None)
def bandwidth(elements: int) -> float:
    """Bytes per second read and written by a float32 elementwise kernel (c = a x b: 3 x 4 bytes an element) on
    tensors of `elements`: activation-sized ones may sit in cache, weight-sized ones stream from memory."""
    import torch

    a, b, c = torch.randn(elements), torch.randn(elements), torch.empty(elements)
    return 12.0 * elements / seconds_per_call(lambda: torch.mul(a, b, out=c))


@functools.lru_cache(maxsize=None)
def op_seconds() -> float:
    """Seconds per small operator: Python and the dispatcher, what a decoder layer's ~150-230 operators cost
    beyond their arithmetic."""
    import torch

    a = torch.randn(8, requires_grad=True)  # as in training: each operator records its autograd node
    return seconds_per_call(lambda: [torch.add(a, a) for _ in range(100)]) / 100


@functools.lru_cache(maxsize=None)
def dequantize_rate(fan_out: int, fan_in: int) -> float | None:
    """nf4 weights (double-quantized absmax, blocks of 64) dequantized to float32 per second by bitsandbytes on CPU,
    as its 4-bit matmul does for every forward and backward; None without bitsandbytes."""
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except ImportError:
        return None
    packed, state = bnbf.quantize_4bit(torch.randn(fan_out, fan_in), quant_type="nf4", compress_statistics=True)
    return fan_out * fan_in / seconds_per_call(lambda: bnbf.dequantize_4bit(packed, state))


def rank_threads(nproc: int) -> int:
    """Threads a rank computes with: this process's now when it is the only rank or a rank already (train); for a
    plan of several ranks, OMP_NUM_THREADS or torchrun's default of 1."""
    import torch

    if nproc == 1 or os.environ.get("LOCAL_RANK") is not None:
        return torch.get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


@functools.lru_cache(maxsize=None)
def measure_cpu_rates(pass_tokens: int, hidden: int, intermediate: int, heads: int, head_dim: int, vocab: int,
                      row_tokens: int, chunk: int, nf4: bool = False, threads: int | None = None) -> CpuRates:
    """All the rates at a model's shapes (a pass of pass_tokens, rows of row_tokens, output-layer chunks of chunk
    supervised tokens), measured with `threads` threads; a few tenths of a second, once per process and shape."""
    import torch

    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        m = max(16, min(pass_tokens, MAX_MEASURED_TOKENS))
        c = max(16, min(chunk, 256))
        v = min(vocab, 8192)
        return CpuRates(
            linear_flops=linear_rate(m, hidden, intermediate, True),
            frozen_linear_flops=linear_rate(m, hidden, intermediate, False),
            head_flops=linear_rate(c, hidden, v, True), frozen_head_flops=linear_rate(c, hidden, v, False),
            attention_flops=attention_rate(min(row_tokens, 512), heads, head_dim),
            softmax_logits=softmax_rate(c, v), activation_bandwidth=bandwidth(m * max(hidden, intermediate)),
            weight_bandwidth=bandwidth(2 ** 23), op_seconds=op_seconds(),
            dequantize_weights=dequantize_rate(intermediate, hidden) if nf4 else None, threads=threads)
    finally:
        torch.set_num_threads(before)
