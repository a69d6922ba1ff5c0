"""A model's shape read from its config.json alone (no weights, no torch): what every memory and FLOP formula of
`mftcoder plan` is written in. One reader per family layout; an unknown family is a PlanError (a sentence)."""

from __future__ import annotations

from dataclasses import dataclass


class PlanError(ValueError):
    """The plan cannot be made (an unknown model family, a config.json without the fields it needs): a sentence."""


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer: its name (what LoRA's target_modules match), sizes and bias."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool
    reads: str  # which activation it reads: 'attn_in', 'attn_out', 'mlp_in', 'mlp_mid' (saved once however many read it)


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need. layout 'gated' (Llama-like: RMSNorm, SiLU gate/up/down) or 'neox' (LayerNorm, GELU,
    fused query_key_value); separate_attn_out: the attention output projection reads its own copy of the attention
    kernel's output (GPT-NeoX) rather than a view of it (Llama)."""

    model_type: str
    layout: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]
    norm_params: int  # per decoder layer
    final_norm_params: int
    rotary_dims: int
    parallel_residual: bool = False
    separate_attn_out: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k

    @property
    def layer_params(self) -> int:
        return sum(l.fan_in * l.fan_out + l.bias * l.fan_out for l in self.linears) + self.norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The output layer's own parameters (0 when tied to the input embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def body_params(self) -> int:
        """The decoder layers and the final norm: the parameters every token's matmuls go through."""
        return self.layers * self.layer_params + self.final_norm_params

    @property
    def params(self) -> int:
        return self.body_params + self.embedding_params + self.head_params

    @property
    def buffer_bytes(self) -> int:
        """Rotary inv_freq and original_inv_freq (float32): the model's only buffers in these families."""
        return 2 * (self.rotary_dims // 2) * 4


GATED = ("llama", "mistral", "qwen2", "qwen3")
KNOWN = GATED + ("gpt_neox",)


def _field(raw: dict, *names: str, default=None):
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    if default is None:
        raise PlanError(f"config.json has no {names[0]!r}; plan cannot size this model")
    return default


def _rotary_dims(raw: dict, head_dim: int) -> int:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get("rotary_pct", 1.0)))
    return int(head_dim * factor)


def read_shape(raw: dict) -> ModelShape:
    """The shape of a model from its config.json mapping; PlanError (a sentence) for a family plan does not know."""
    model_type = raw.get("model_type")
    if model_type not in KNOWN:
        raise PlanError(f"model_type {model_type!r}: plan sizes {', '.join(KNOWN)} from config.json; for another "
                        "family it has no formulas (train a few steps and read the measured peak instead)")
    h, layers = int(_field(raw, "hidden_size")), int(_field(raw, "num_hidden_layers"))
    heads = int(_field(raw, "num_attention_heads"))
    vocab = int(_field(raw, "vocab_size"))
    if model_type == "gpt_neox":
        i = int(_field(raw, "intermediate_size", default=4 * h))
        bias = bool(raw.get("attention_bias", True))
        linears = (Linear("query_key_value", h, 3 * h, bias, "attn_in"), Linear("dense", h, h, bias, "attn_out"),
                   Linear("dense_h_to_4h", h, i, True, "mlp_in"), Linear("dense_4h_to_h", i, h, True, "mlp_mid"))
        return ModelShape(model_type, "neox", h, i, layers, heads, heads, h // heads, vocab,
                          bool(raw.get("tie_word_embeddings", False)), linears, norm_params=4 * h,
                          final_norm_params=2 * h, rotary_dims=_rotary_dims(raw, h // heads),
                          parallel_residual=bool(raw.get("use_parallel_residual", True)), separate_attn_out=True)
    i = int(_field(raw, "intermediate_size"))
    kv = int(_field(raw, "num_key_value_heads", default=heads))
    hd = int(raw.get("head_dim") or h // heads)
    attn_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
    mlp_bias = bool(raw.get("mlp_bias", False))
    linears = (Linear("q_proj", h, heads * hd, attn_bias, "attn_in"), Linear("k_proj", h, kv * hd, attn_bias, "attn_in"),
               Linear("v_proj", h, kv * hd, attn_bias, "attn_in"),
               Linear("o_proj", heads * hd, h, attn_bias and model_type != "qwen2", "attn_out"),
               Linear("gate_proj", h, i, mlp_bias, "mlp_in"), Linear("up_proj", h, i, mlp_bias, "mlp_in"),
               Linear("down_proj", i, h, mlp_bias, "mlp_mid"))
    qk_norm = model_type == "qwen3"
    return ModelShape(model_type, "gated", h, i, layers, heads, kv, hd, vocab,
                      bool(raw.get("tie_word_embeddings", False)), linears,
                      norm_params=2 * h + (2 * hd if qk_norm else 0), final_norm_params=h,
                      rotary_dims=_rotary_dims(raw, hd), qk_norm=qk_norm)


def lora_layers(shape: ModelShape, targets: list[str] | str) -> tuple[Linear, ...]:
    """The decoder-layer linears LoRA wraps: names matched as PEFT does (a module name ending with a target),
    'all-linear' every one of them (never the output layer)."""
    if targets == "all-linear" or targets == ["all-linear"]:
        return shape.linears
    wanted = [targets] if isinstance(targets, str) else list(targets)
    return tuple(l for l in shape.linears if any(l.name == t or l.name.endswith("." + t) for t in wanted))
