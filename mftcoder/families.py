"""What mftcoder knows of each model family, and the start-up checks that decide on the user's actual model:
whether the fused output layer gives the model's own loss, and whether packed samples stay isolated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOLERANCE = 1e-3  # per-token cross-entropy; an exact path differs by ~1e-6, a leak or a transform by far more


@dataclass(frozen=True)
class Family:
    """lora_targets: modules LoRA wraps by default; attn_implementation: the attention the family trains with;
    fused_head: False where logits are not the plain output layer of the last hidden state."""

    lora_targets: tuple[str, ...] | str = "all-linear"
    attn_implementation: str | None = "sdpa"  # None: what transformers picks for the model
    fused_head: bool = True


FAMILIES = {
    "gpt_neox": Family(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "llama": Family(LLAMA_LIKE),
    "mistral": Family(LLAMA_LIKE),
    "qwen2": Family(LLAMA_LIKE),
    "qwen3": Family(LLAMA_LIKE),
    "starcoder2": Family(("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
    "gpt_bigcode": Family(("c_attn", "c_proj", "c_fc")),
    # Soft-capped attention logits need eager attention (SDPA refuses them); the final logits are soft-capped.
    "gemma2": Family(LLAMA_LIKE, attn_implementation="eager", fused_head=False),
    "cohere": Family(LLAMA_LIKE, fused_head=False),  # logit_scale
    "granite": Family(LLAMA_LIKE, fused_head=False),  # logits_scaling
    "mixtral": Family(("q_proj", "k_proj", "v_proj", "o_proj")),  # experts are fused tensors, not Linear layers
}
UNKNOWN = Family(attn_implementation=None)  # the safe choices; the start-up checks decide the rest


def family(model_type: str) -> Family:
    return FAMILIES.get(model_type, UNKNOWN)


def attn_implementation(model_config, requested: str = "auto") -> str | None:
    """The attention kernel: the one asked for, else the family's (eager for models that soft-cap attention
    logits, which SDPA cannot). Whether packed samples stay isolated in it is checked at start-up."""
    if requested == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            from mftcoder.config import ConfigError

            raise ConfigError("attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                              "(pip install flash-attn); use sdpa")
    if requested != "auto":
        return requested
    if getattr(model_config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return family(model_config.model_type).attn_implementation


def check_attention_device(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse an attention kernel that cannot train on this device (measured: torch 2.13's FlexAttention has
    no backward on CPU)."""
    from mftcoder.config import ConfigError

    if getattr(model.config, "_attn_implementation", None) == "flex_attention" and device.type == "cpu":
        raise ConfigError("attn_implementation: flex_attention has no backward pass on CPU in this torch; "
                          "use sdpa (the CPU default: a flash kernel that keeps packed samples apart)")


def logit_transforms(model_config) -> list[str]:
    """What the model does to the output layer's result (or adds to the loss), read from its config."""
    found = []
    if getattr(model_config, "final_logit_softcapping", None) is not None:
        found.append("final_logit_softcapping")
    for name in ("logit_scale", "logits_scaling"):
        if getattr(model_config, name, None) not in (None, 1, 1.0):
            found.append(name)
    if getattr(model_config, "output_router_logits", False):
        found.append("router auxiliary loss")
    return found


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
def packing_difference(runner: torch.nn.Module, samples: list, pad_id: int, device: torch.device) -> float:
    """Largest per-token loss difference between the samples packed in one row and each run alone."""
    from mftcoder.data.batching import collate

    was_training = runner.training
    runner.eval()
    packed = runner(collate([samples], pad_id, packed=True).to(device))[1]
    apart = torch.cat([runner(collate([[s]], pad_id).to(device))[1] for s in samples])
    runner.train(was_training)
    return float((packed - apart).abs().max())


@torch.no_grad()
def head_difference(model: torch.nn.Module, runner: torch.nn.Module, sample: tuple, device: torch.device) -> float:
    """Largest per-token loss difference between the fused output layer and the model's own logits."""
    import torch.nn.functional as F

    from mftcoder.data.batching import collate

    was_training = model.training
    model.eval()
    batch = collate([[sample]], 0).to(device)
    fused = runner(batch)[1]
    logits = model(input_ids=batch.input_ids, use_cache=False).logits[batch.loss_mask]
    own = F.cross_entropy(logits.float(), batch.targets[batch.loss_mask], reduction="none")
    model.train(was_training)
    return float((fused - own).abs().max())


def float32_probe(model: torch.nn.Module, layers: int = 2) -> torch.nn.Module:
    """The model the start-up checks run on: the model itself when it computes in float32; otherwise a float32
    miniature (same config and code, `layers` decoder layers, random weights), because bf16 rounding (up to 0.25
    per token measured) would hide a leak or a logit transform. Both are properties of the code, not the weights."""
    import copy

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if all(p.dtype == torch.float32 for p in inner.parameters() if p.is_floating_point()):
        return model
    config = copy.deepcopy(inner.config)
    config.num_hidden_layers = min(layers, config.num_hidden_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    config.quantization_config = None
    # The class already loaded (no code is fetched or trusted anew). flash_attention_2 runs only in half precision:
    # its miniature is bf16, so its check keeps bf16 noise (untested here: no GPU; it may turn packing off).
    dtype = torch.bfloat16 if config._attn_implementation == "flash_attention_2" else torch.float32
    with torch.random.fork_rng(devices=[]):  # its random init leaves the run's RNG (dropout, order) untouched
        torch.manual_seed(0)
        return type(inner)._from_config(config, dtype=dtype, attn_implementation=config._attn_implementation).eval()


def build_runner(model: torch.nn.Module, padding_mode: str, per_task, pad_id: int, device: torch.device,
                 say=None) -> tuple[torch.nn.Module, str]:
    """The SupervisedLM for this model, and the batch layout, both checked on the model itself: the fused output
    layer only where it gives the model's own loss, packing only where packed samples stay isolated."""
    from mftcoder.config import ConfigError
    from mftcoder.loss import SupervisedLM

    check_attention_device(model, device)
    samples = probe_samples(per_task)
    probe = float32_probe(model)
    if probe is not model:
        probe = probe.to(device)
    transforms = logit_transforms(model.config)
    fused = family(model.config.model_type).fused_head and not transforms
    if fused:
        gap = head_difference(probe, SupervisedLM(probe), samples[0], device)
        if gap > TOLERANCE:
            fused = False
            if say:
                say(f"warning: the model's logits are not its output layer's (per-token losses differ by {gap:.3g}); "
                    "the loss uses the model's own logits at supervised positions")
    runner = SupervisedLM(model, fused_head=fused)
    if padding_mode not in ("auto", "pack"):
        return runner, padding_mode
    gap = packing_difference(runner if probe is model else SupervisedLM(probe, fused_head=fused), samples, pad_id,
                             device)
    if gap <= TOLERANCE:
        return runner, "pack"
    reason = (f"this model does not keep packed samples apart (per-token losses of two samples packed in one row "
              f"differ from each alone by up to {gap:.3g})")
    if padding_mode == "pack":
        raise ConfigError(f"padding_mode: pack: {reason}; use padding_mode: dynamic")
    if say:
        say(f"warning: {reason}; padding_mode auto uses dynamic padding instead of packing")
    return runner, "dynamic"
