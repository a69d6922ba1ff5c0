"""The start-up checks that decide on the user's actual model, run through the runner it trains with: whether the
fused output layer gives the model's own loss, and whether packed samples stay isolated."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mftcoder.config import ConfigError
from mftcoder.data.batching import collate
from mftcoder.families import family, half_precision_only, logit_transforms
from mftcoder.loss import SupervisedLM

TOLERANCE = 1e-3  # per-token cross-entropy; an exact path differs by ~1e-6, a leak or a transform by far more
REDUCED_PRECISION_LEAK = 0.05  # the leak check in bf16: an isolated sample moves by 0 (measured), a leak by ~0.3-1


def probe_samples(per_task, length: int = 24) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Two short samples from the run's own data (every position supervised), for the start-up checks."""
    samples = []
    for task in per_task:
        for record in np.concatenate([task.train, task.valid])[:2 - len(samples)]:
            ids, _ = task.sample(int(record))
            ids = ids[:length]
            if len(ids) >= 4:
                samples.append((ids, np.ones(len(ids), dtype=np.uint8), task.task.id))
        if len(samples) == 2:
            return samples
    rng = np.random.default_rng(0)  # fewer than two usable samples: random ids below 1000 (in every vocabulary)
    return [(rng.integers(3, 1000, length).astype(np.int32), np.ones(length, dtype=np.uint8), 0)
            for _ in range(2)]


@torch.no_grad()
def token_losses(runner: torch.nn.Module, rows: list, pad_id: int, device: torch.device, packed: bool = True,
                 autocast=None) -> torch.Tensor:
    """The runner's per-token losses (loss_mask order) for rows of samples, in eval mode."""
    was_training = runner.training
    runner.eval()
    with autocast or contextlib.nullcontext():
        losses = runner(collate(rows, pad_id, packed=packed).to(device))[1].float()
    runner.train(was_training)
    return losses


def probe_rows(a, b) -> list:
    """Three packed rows: each sample once first and once after another, the last row with trailing padding; one
    row after another, every sample but the very first follows another."""
    return [[a, b], [b, a], [b]]


def position_gap(runner: torch.nn.Module, samples: list, pad_id: int, device: torch.device) -> float:
    """Largest per-token loss difference between the samples packed (probe_rows) and each alone: ~1e-6 in float32
    where positions restart at every sample and no sample sees another."""
    rows = probe_rows(*samples)
    packed = token_losses(runner, rows, pad_id, device)
    alone = token_losses(runner, [[s] for row in rows for s in row], pad_id, device, packed=False)
    return float((packed - alone).abs().max())


def leak_gap(runner: torch.nn.Module, samples: list, pad_id: int, device: torch.device, autocast=None) -> float:
    """Largest change of a packed sample's per-token losses when the samples packed before it are replaced by others
    of the same lengths. Where no sample sees another this is 0 in any precision (the same kernels on the same shapes);
    a leak moves them by ~0.3-1 (measured on random tiny and SmolLM2-shaped models, float32 and bf16). So it checks the
    run's own kernel, dtype and autocast, where comparing with each sample alone would compare bf16 noise.
    `samples`: two probe_samples (every position supervised, which the spans below count on)."""
    a, b = samples
    other = [(_other_tokens(ids), mask, task) for ids, mask, task in samples]
    base = token_losses(runner, probe_rows(a, b), pad_id, device, autocast=autocast)
    na, nb = len(a[0]) - 1, len(b[0]) - 1  # supervised positions of each sample (its last token has no target)
    b_spans = [(na, na + nb), (na + nb, na + 2 * nb), (2 * na + 2 * nb, 2 * na + 3 * nb)]
    a_spans = [(na + 2 * nb, 2 * na + 2 * nb)]
    gap = 0.0
    for changed, spans in ((probe_rows(other[0], b), b_spans), (probe_rows(a, other[1]), a_spans)):
        moved = token_losses(runner, changed, pad_id, device, autocast=autocast)
        gap = max(gap, *(float((base[i:j] - moved[i:j]).abs().max()) for i, j in spans))
    return gap


def _other_tokens(ids: np.ndarray) -> np.ndarray:
    """Token ids below 1000 (in every vocabulary) that differ from `ids` at every position."""
    other = np.random.default_rng(len(ids)).integers(3, 999, len(ids)).astype(ids.dtype)
    return np.where(other == ids, other + 1, other)


def head_gap(runner: torch.nn.Module, supervised, sample: tuple, device: torch.device) -> float:
    """Largest per-token loss difference between the fused output layer and the model's own logits (both through the
    runner, so the same code serves a model an engine has wrapped)."""
    chosen, losses = supervised.fused_head, []
    for fused in (True, False):
        supervised.fused_head = fused
        losses.append(token_losses(runner, [[sample]], 0, device, packed=False))
    supervised.fused_head = chosen
    return float((losses[0] - losses[1]).abs().max())


def float32_probe(model: torch.nn.Module, layers: int = 2) -> torch.nn.Module:
    """A float32 miniature of the model (same config and code, `layers` decoder layers, random weights) for the
    checks that compare with float32 exactness (bf16 rounding moves per-token losses by up to 0.25 measured, which
    would hide a logit transform or a position error); they check the model's code, not its weights. A kernel that
    has no float32 (flash-attention) is replaced by sdpa there: the leak check runs the real kernel."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(inner.config)
    config.num_hidden_layers = min(layers, config.num_hidden_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    config.quantization_config = None
    kernel = "sdpa" if half_precision_only(config._attn_implementation) else config._attn_implementation
    with torch.random.fork_rng(devices=[]):  # its random init leaves the run's RNG (dropout, order) untouched
        torch.manual_seed(0)
        # The class already loaded: no code is fetched or trusted anew.
        return type(inner)._from_config(config, dtype=torch.float32, attn_implementation=kernel).eval()


@dataclass
class CheckContext:
    """What the start-up checks run with: the run's autocast, its device, whether it computes in float32, how the ranks
    agree on a measured gap (the largest over ranks), and where warnings go."""

    device: torch.device
    autocast: contextlib.AbstractContextManager
    exact: bool  # computes_in_float32
    agree: Callable[[float], float] = lambda gap: gap
    say: Callable[[str], None] | None = None


def check_runner(supervised, runner: torch.nn.Module, padding_mode: str, samples: list, pad_id: int,
                 context: CheckContext) -> str:
    """Decide on the model as it will train (after its engine wrapped it; under FSDP every rank runs these together):
    the fused output layer only where it gives the model's own loss, packing only where packed samples stay apart.
    `samples`: two probe_samples. Sets supervised.fused_head; returns the padding mode."""
    model, say = supervised.model, context.say
    exact_runner, exact = runner, supervised
    if not context.exact:
        exact = exact_runner = SupervisedLM(float32_probe(model).to(context.device), flat_packing=supervised.flat_packing)
    fused = family(model.config.model_type).fused_head and not logit_transforms(model.config)
    if fused:
        gap = context.agree(head_gap(exact_runner, exact, samples[0], context.device))
        if gap > TOLERANCE:
            fused = False
            if say:
                say(f"warning: the model's logits are not its output layer's (per-token losses differ by {gap:.3g}); "
                    "the loss uses the model's own logits at supervised positions")
    supervised.fused_head = exact.fused_head = fused
    if padding_mode not in ("auto", "pack"):
        return padding_mode
    positions = context.agree(position_gap(exact_runner, samples, pad_id, context.device))
    leak = context.agree(leak_gap(runner, samples, pad_id, context.device, context.autocast))
    leak_limit = TOLERANCE if context.exact else REDUCED_PRECISION_LEAK
    if say:
        say(f"note: packing check: samples packed in rows vs each alone differ by {positions:.2g} (float32), move by "
            f"{leak:.2g} when the samples before them change (limit {leak_limit:g})")
    if positions <= TOLERANCE and leak <= leak_limit:
        return "pack"
    reason = ("this model does not keep packed samples apart (per-token losses of samples packed in rows differ "
              f"from each alone by up to {positions:.3g} in float32, and move by up to {leak:.3g} when the samples "
              "before them change)")
    if padding_mode == "pack":
        raise ConfigError(f"padding_mode: pack: {reason}; use padding_mode: dynamic")
    if say:
        say(f"warning: {reason}; padding_mode auto uses dynamic padding instead of packing")
    return "dynamic"
