"""What mftcoder knows of each model family, and what it reads from a model's config and weights: the attention
kernel, whether packed rows go in as one, what the model does to its logits, whether it computes in float32. The
start-up checks that run the model (fused output layer, packing) are in mftcoder/train/model_checks.py."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from mftcoder.config import ConfigError

LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise ConfigError("attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                              "(pip install flash-attn); use sdpa")
    if requested != "auto":
        return requested
    if getattr(model_config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return family(model_config.model_type).attn_implementation


ROW_MASK_KERNELS = ("sdpa", "eager", "flex_attention")  # take a per-row mask built from restarting position ids


def packs_as_one_row(kernel: str | None) -> bool:
    """Whether packed rows must reach the model as one flattened row. For sdpa, eager and flex_attention transformers
    builds a block-diagonal mask per row from restarting position ids; any other kernel (flash-attention) sees sample
    boundaries only in a batch of one row, and with more rows would let a row's samples attend to each other.
    (Flattening costs those three the attention of B rows as one: B times the quadratic part.)"""
    return kernel not in ROW_MASK_KERNELS


def half_precision_only(kernel: str | None) -> bool:
    """flash-attention computes in bf16/fp16 only."""
    return kernel is not None and "flash" in kernel


def check_attention(model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
    """Refuse an attention kernel that cannot train here: torch's FlexAttention has no backward on CPU (measured
    with torch 2.13); flash-attention takes only bf16/fp16, so float32 weights need bf16 compute (autocast)."""
    kernel = getattr(model.config, "_attn_implementation", None)
    if kernel == "flex_attention" and device.type == "cpu":
        raise ConfigError("attn_implementation: flex_attention has no backward pass on CPU in this torch; "
                          "use sdpa (the CPU default: a flash kernel that keeps packed samples apart)")
    if half_precision_only(kernel) and not bf16 and float32_weights(model):
        raise ConfigError(f"attn_implementation: {kernel} computes in bf16/fp16 only, and this run computes in float32 "
                          "(bf16: false with float32 weights); set bf16: true (the GPU default) or torch_dtype: "
                          "bfloat16, or use sdpa")


def float32_weights(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return all(p.dtype == torch.float32 for p in inner.parameters() if p.is_floating_point())


def computes_in_float32(model: torch.nn.Module, bf16: bool) -> bool:
    """Whether the model's forward runs in float32 (no bf16 autocast or mixed precision, float32 weights, a kernel that
    takes float32): then the exact start-up checks can run on the model itself."""
    return (not bf16 and not half_precision_only(getattr(model.config, "_attn_implementation", None))
            and float32_weights(model))


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
