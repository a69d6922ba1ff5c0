"""What this CPU does per second at a model's own shapes: the rates the CPU step-time terms divide by. Each is
measured as the step runs it (cold inputs, fresh results, peft's adapter path, mftcoder's fused head) with the thread
count a rank trains with, once per machine and shape: kept in cpu_rates.json in mftcoder's cache, and per process
(functools.lru_cache)."""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# gloo's bytes received per second per rank between 2 local ranks, 64 MiB tensors (`bench/plan_calibrate.py gloo`,
# idle 2-core development machine, median of 3: all-gather 0.47-0.52 GB/s, reduce-scatter 0.30-0.41). Not measured
# when a plan is made: that needs 2 processes.
GLOO_GATHER_BYTES_PER_S = 0.51e9
GLOO_SCATTER_BYTES_PER_S = 0.39e9
MEASURE_SECONDS = 0.04  # per round of a rate: a few calls of a kernel; five rounds, the median kept
MAX_MEASURED_TOKENS = 512  # matmul rates at the model's widths are flat from here up (within 3% at 1024 tokens)
STREAMED_BYTES = 96 * 2**20  # more than a server CPU's last-level cache (32 MiB here): inputs come from memory
RATES_VERSION = 4  # part of the rates file's keys: a change to how rates are measured invalidates the kept ones
HEAD_ELEMENTS = 2**24  # logits of the output layer's measured chunk, and elements of its weight at most


@dataclass(frozen=True)
class CpuRates:
    """Measured rates: FLOP/s of the decoder's linears (forward + backward, with and without weight gradients), of the
    output layer's, of attention; logits per second through the fused head's softmax steps; bytes per second of
    elementwise kernels at activation size and at weight size; seconds per small operator; nf4 weights dequantized
    per second (QLoRA only); gloo bytes per second (a documented constant)."""

    linear_flops: float
    frozen_linear_flops: float
    head_logits: float
    attention_flops: float
    activation_bandwidth: float
    weight_bandwidth: float
    op_seconds: float
    dequantize_weights: float | None
    adapter_flops: float | None = None
    gloo_gather_bytes: float = GLOO_GATHER_BYTES_PER_S
    gloo_scatter_bytes: float = GLOO_SCATTER_BYTES_PER_S
    threads: int = 1

    def describe(self) -> str:
        """The rates in one line, in GFLOP/s, G logits/s, GB/s and microseconds."""
        g = 1e9
        text = (f"{self.threads} thread(s); linears {self.linear_flops / g:.0f} GFLOP/s (frozen "
                f"{self.frozen_linear_flops / g:.0f}), attention {self.attention_flops / g:.0f}; output layer and loss "
                f"{self.head_logits / g:.3f} G logits/s; "
                f"bandwidth {self.activation_bandwidth / g:.1f} GB/s (activations), {self.weight_bandwidth / g:.1f} "
                f"(weights); {self.op_seconds * 1e6:.1f} us per operator")
        if self.dequantize_weights:
            text += f"; nf4 dequantization {self.dequantize_weights / g:.2f} G weights/s"
        if self.adapter_flops:
            text += f"; LoRA adapters {self.adapter_flops / g:.1f} GFLOP/s"
        return text + (f"; gloo {self.gloo_gather_bytes / g:.2f} GB/s all-gather, {self.gloo_scatter_bytes / g:.2f} "
                       "reduce-scatter (constants)")


def seconds_per_call(call: Callable[[], object], seconds: float = MEASURE_SECONDS, least: int = 2,
                     rounds: int = 5) -> float:
    """Wall seconds per call of `call`: one warm-up call, then `rounds` rounds of calls until `seconds` passed (at
    least `least` calls); the median round (a round hit by another process's burst does not move it)."""
    call()
    per_round = []
    for _ in range(rounds):
        started, count = time.perf_counter(), 0
        while count < least or time.perf_counter() - started < seconds:
            call()
            count += 1
        per_round.append((time.perf_counter() - started) / count)
    return statistics.median(per_round)


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
def adapter_rate(tokens: int, fan_in: int, fan_out: int, rank: int, dropout: bool) -> float:
    """Matmul FLOP/s of a LoRA adapter run as peft runs it, forward and backward: result + B(A(dropout(x))) x scaling,
    with the input and both factors trained. Low-rank matmuls read a whole activation for a few outputs and the
    dropout mask is drawn by one thread (CPU's generator does not parallelise), so this runs far below a linear's rate
    (rank 8 at SmolLM2's widths: ~35 GFLOP/s of matmuls without dropout, ~10 with it, where the linear runs at ~180)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(tokens, fan_in, requires_grad=True)
    a = torch.randn(rank, fan_in, requires_grad=True)
    b = torch.randn(fan_out, rank, requires_grad=True)
    base = torch.randn(tokens, fan_out, requires_grad=True)
    grad = torch.randn(tokens, fan_out)

    def step() -> None:
        x.grad = a.grad = b.grad = base.grad = None
        dropped = F.dropout(x, 0.05, training=True) if dropout else x
        (base + F.linear(F.linear(dropped, a), b) * 2.0).backward(grad)

    return 3 * 2.0 * tokens * rank * (fan_in + fan_out) / seconds_per_call(step)


def combined_rate(work_and_rates: list[tuple[float, float]]) -> float:
    """One rate for work split over kernels of different rates: total work / total time."""
    return sum(w for w, _ in work_and_rates) / sum(w / r for w, r in work_and_rates)


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
def head_rate(hidden: int, vocab: int, weight_grad: bool) -> float:
    """Logits per second through mftcoder's fused output layer and loss (mftcoder/loss.py), forward and backward, on
    one chunk: the logits matmul, logsumexp, the softmax in place, the hidden states' gradient and (full fine-tuning)
    the weight's. The chunk holds at least 2^24 logits, so that, like a real chunk of up to 1024 tokens x the
    vocabulary, its float32 logits are newly mapped memory (page faults on first touch: above glibc's 32 MiB mmap
    threshold) rather than reused heap; the vocabulary is cut to 2^24 / hidden rows of weight (the rate per logit
    is flat in both)."""
    import torch

    from mftcoder.loss import FusedLinearCrossEntropy

    rows = min(vocab, max(1024, HEAD_ELEMENTS // hidden))
    tokens = min(1024, max(64, -(-HEAD_ELEMENTS // rows)))
    states = torch.randn(tokens, hidden, requires_grad=True)
    weight = (torch.randn(rows, hidden) / hidden ** 0.5).requires_grad_(weight_grad)  # real logits' scale: no denormals
    targets = torch.randint(0, rows, (tokens,))
    coefficients = torch.full((tokens,), 1.0 / tokens)

    def step() -> None:
        states.grad = weight.grad = None
        FusedLinearCrossEntropy.apply(states, weight, None, targets, coefficients, tokens)[0].backward()

    return tokens * rows / seconds_per_call(step, least=1)


@functools.lru_cache(maxsize=None)
def bandwidth(elements: int) -> float:
    """Bytes per second read and written by a float32 elementwise kernel (c = a x b: 3 x 4 bytes an element) on
    weight-sized tensors updated in place, as the optimizer does (they stream from memory)."""
    import torch

    a, b, c = torch.randn(elements), torch.randn(elements), torch.empty(elements)
    return 12.0 * elements / seconds_per_call(lambda: torch.mul(a, b, out=c))


@functools.lru_cache(maxsize=None)
def activation_bandwidth(elements: int) -> float:
    """Bytes per second of a float32 elementwise kernel (c = a x b) as a training pass runs it: inputs written long
    before (rotated through more memory than the last-level cache holds), the result newly allocated. Timed on
    cache-resident tensors instead, the rate came out 3-4x higher than the kernels' rate inside a step."""
    import torch

    copies = max(2, STREAMED_BYTES // (8 * elements))
    inputs = [(torch.full((elements,), 1.5), torch.full((elements,), 0.5)) for _ in range(copies)]
    turn = itertools.count()
    return 12.0 * elements / seconds_per_call(lambda: torch.mul(*inputs[next(turn) % copies]))


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


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_tokens(tokens: int) -> int:
    """The token count a rate is measured at: the next power of two from 64, at most MAX_MEASURED_TOKENS (rates are
    flat from there up), so that runs of nearby shapes share one measurement."""
    return min(MAX_MEASURED_TOKENS, 1 << max(6, (max(1, tokens) - 1).bit_length()))


def rates_file() -> Path:
    """Where measured rates are kept between runs: the mftcoder cache ($MFTCODER_CACHE or ~/.cache/mftcoder)."""
    from mftcoder.data.tokenize import default_cache_root

    return default_cache_root() / "cpu_rates.json"


@functools.lru_cache(maxsize=None)
def measure_cpu_rates(pass_tokens: int, hidden: int, intermediate: int, heads: int, head_dim: int, vocab: int,
                      row_tokens: int, nf4: bool = False, threads: int | None = None,
                      dropout: bool = False, adapters: tuple[tuple[int, int], ...] = (),
                      lora_rank: int = 0, frozen_head: bool = False) -> CpuRates:
    """measure_cpu_rates_now's rates, kept on disk per CPU model, torch version, threads and shapes: a machine
    measures a shape once (1-3 s), later runs and plans read them. Delete the file to measure again (rates measured
    while the machine was busy would stay too slow)."""
    import torch

    pass_tokens, row_tokens = measured_tokens(pass_tokens), measured_tokens(row_tokens)
    shapes = (pass_tokens, hidden, intermediate, heads, head_dim, vocab, row_tokens, nf4)  # as measured
    lora = (dropout, adapters, lora_rank, frozen_head)
    threads = threads or torch.get_num_threads()
    key = json.dumps([RATES_VERSION, cpu_name(), torch.__version__, threads, shapes, lora])
    path = rates_file()
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    if key in kept:
        try:
            return CpuRates(**kept[key])
        except TypeError:  # written by another version of CpuRates
            pass
    with torch.random.fork_rng(devices=[]):  # measuring draws random tensors and masks: not from the run's stream
        rates = measure_cpu_rates_now(*shapes, threads, *lora)
    kept[key] = {k: v for k, v in asdict(rates).items() if not k.startswith("gloo")}  # gloo's are constants
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(kept, indent=0))
        temporary.replace(path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return rates


def measure_cpu_rates_now(pass_tokens: int, hidden: int, intermediate: int, heads: int, head_dim: int, vocab: int,
                          row_tokens: int, nf4: bool = False, threads: int | None = None,
                          dropout: bool = False, adapters: tuple[tuple[int, int], ...] = (),
                          lora_rank: int = 0, frozen_head: bool = False) -> CpuRates:
    """All the rates at a model's shapes (a pass of pass_tokens, rows of row_tokens, both as measured_tokens rounds
    them), measured now with `threads` threads (1-3 s)."""
    import torch

    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        m = measured_tokens(pass_tokens)
        return CpuRates(
            linear_flops=linear_rate(m, hidden, intermediate, True),
            frozen_linear_flops=linear_rate(m, hidden, intermediate, False),
            head_logits=head_rate(hidden, vocab, not frozen_head),
            attention_flops=attention_rate(measured_tokens(row_tokens), heads, head_dim),
            activation_bandwidth=activation_bandwidth(m * max(hidden, intermediate)),
            weight_bandwidth=bandwidth(2 ** 23), op_seconds=op_seconds(),
            dequantize_weights=dequantize_rate(intermediate, hidden) if nf4 else None,
            threads=threads,
            adapter_flops=combined_rate([(fan_in + fan_out, adapter_rate(m, fan_in, fan_out, lora_rank, dropout))
                                         for fan_in, fan_out in adapters]) if adapters else None)
    finally:
        torch.set_num_threads(before)
