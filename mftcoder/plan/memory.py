"""Peak memory of one rank's training step, component by component, each a formula of the model's shape and the run's
settings (docs/plan.md writes them out). The activation formulas count what autograd keeps for backward in
transformers 5 with mftcoder's fused output layer (checked against saved_tensors_hooks in tests/test_plan.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mftcoder.plan.shape import Linear, ModelShape

GIB = 2 ** 30
BATCH_BYTES_PER_TOKEN = 73  # collate's tensors: 8 int64 [B, T] tensors, the bool loss mask and the float64 reference
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 * (1 + 4 / 256), "int8": 1.0}  # per weight: 4 bits + double-quantized absmax


@dataclass(frozen=True)
class RunSetup:
    """The run as the formulas see it: method ('full', 'lora', 'qlora'), dtypes as bytes per element, the pass's
    shape (rows x row_tokens; supervised tokens), the engine ('single', 'ddp', 'fsdp') and its ranks."""

    method: str
    weight_bytes: int
    act_bytes: int
    lora_rank: int = 8
    lora_targets: tuple[Linear, ...] = ()
    lora_dropout: bool = False
    quantization: str | None = None
    checkpointing: bool = False
    rows_per_pass: int = 8
    row_tokens: int = 2048
    supervised_fraction: float = 0.6
    passes_per_step: int = 1
    micro_batch_rows: int = 8
    accumulation: int = 1
    engine: str = "single"
    nproc: int = 1
    fsdp_every_pass: bool = True
    attention: str = "sdpa"
    chunk_tokens: int = 1024
    row_fill: float = 1.0
    fullest_pass_supervised: int | None = None  # from the data: the epoch's fullest pass; else from the fractions
    foreach_optimizer: bool = False  # torch's AdamW default: per-tensor on CPU, foreach (multi-tensor) on CUDA

    @property
    def lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def pass_tokens(self) -> int:
        return self.rows_per_pass * self.row_tokens

    @property
    def supervised_tokens(self) -> int:
        """Supervised tokens of the fullest pass (the run's peak is that pass's), else of an average pass."""
        if self.fullest_pass_supervised is not None:
            return min(self.pass_tokens, self.fullest_pass_supervised)
        return int(round(self.pass_tokens * self.row_fill * self.supervised_fraction))


@dataclass
class MemoryPlan:
    """Bytes per component (the persistent ones, those of one pass, the step's transients) and the peak they make."""

    persistent: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)
    gradients_before_pass: int = 0
    peak: int = 0
    peak_moment: str = ""

    def components(self) -> dict[str, int]:
        return {**self.persistent, **{f"activations: {k}": v for k, v in self.activations.items()}, **self.transient}

    def largest(self) -> tuple[str, int]:
        return max(self.components().items(), key=lambda kv: kv[1])


# --- the model's own tensors --------------------------------------------------------------------------------------
def weight_bytes(shape: ModelShape, run: RunSetup) -> int:
    """params x bytes; QLoRA: the decoder layers' linears quantized, embeddings, norms and output layer as loaded."""
    if run.quantization:
        linear = shape.layers * sum(l.fan_in * l.fan_out for l in shape.linears)
        rows = shape.layers * sum(l.fan_out for l in shape.linears)  # int8 keeps a float32 scale per output row
        quantized = linear * QUANT_BYTES[run.quantization] + (4 * rows if run.quantization == "int8" else 0)
        return int(quantized + (shape.params - linear) * run.weight_bytes + shape.buffer_bytes)
    return shape.params * run.weight_bytes + shape.buffer_bytes


def lora_params(shape: ModelShape, run: RunSetup) -> int:
    """r x (fan_in + fan_out) per wrapped linear, in every decoder layer."""
    return shape.layers * sum(run.lora_rank * (l.fan_in + l.fan_out) for l in run.lora_targets)


def trainable_params(shape: ModelShape, run: RunSetup) -> int:
    return lora_params(shape, run) if run.lora else shape.params


def trainable_tensors(shape: ModelShape, run: RunSetup) -> int:
    """How many parameter tensors train (each has its own AdamW step counter)."""
    if run.lora:
        return 2 * shape.layers * len(run.lora_targets)
    per_layer = len(shape.linears) + sum(l.bias for l in shape.linears)
    norms = (4 if shape.layout == "neox" else 2 + 2 * shape.qk_norm, 2 if shape.layout == "neox" else 1)
    return shape.layers * (per_layer + norms[0]) + norms[1] + 1 + (not shape.tied)


def trainable_bytes(shape: ModelShape, run: RunSetup) -> int:
    """LoRA adapters are float32 on any base; full fine-tuning trains the weights in their own dtype."""
    return trainable_params(shape, run) * (4 if run.lora else run.weight_bytes)


def optimizer_bytes(shape: ModelShape, run: RunSetup) -> int:
    """AdamW: exp_avg and exp_avg_sq in the parameter's dtype, plus a float32 step counter per tensor."""
    return 2 * trainable_bytes(shape, run) + 4 * trainable_tensors(shape, run)


# --- activations kept for backward, per pass ----------------------------------------------------------------------
def _distinct_inputs(linears: tuple[Linear, ...], shape: ModelShape) -> int:
    """Elements per token of the inputs these linears save: layers reading the same tensor share one copy; the
    attention output projection reads a view of the attention output (Llama: counted there) or its own copy."""
    reads = {l.reads: l.fan_in for l in linears}
    if not shape.separate_attn_out:
        reads.pop("attn_out", None)
    return sum(reads.values())


def layer_activations(shape: ModelShape, run: RunSetup) -> dict[str, float]:
    """Elements per token one decoder layer keeps for backward (without checkpointing), by layer type."""
    h, i, nh, hd = shape.hidden, shape.intermediate, shape.heads, shape.head_dim
    # q, k, v, the output and logsumexp; k and v repeated to every head (GQA). GPT-NeoX's v is a view of the fused
    # query_key_value output, which then stays whole (3 x hidden).
    out = {"attention (q, k, v, output, logsumexp)": 4 * nh * hd + nh + (2 * h if shape.layout == "neox" else 0)}
    if run.attention == "eager":
        out["attention (q, k, v, output, logsumexp)"] += nh * run.row_tokens - nh  # softmax weights, no logsumexp
    if shape.qk_norm:
        out["attention (q, k, v, output, logsumexp)"] += (nh + shape.kv_heads) * (hd + 1) * (1 + (not run.lora))
    if shape.layout == "gated":
        out["MLP (gate, activation, up)"] = 3 * i
        out["norms"] = 2 * ((2 * h + 1) if not run.lora else (h + 1))
    else:
        out["MLP (activation input)"] = i
        x_copies = 1 if shape.parallel_residual else 2
        out["norms"] = x_copies * h + 4
    if run.lora:
        targets = run.lora_targets
        if run.lora_dropout:  # each wrapped layer: its own dropped copy and its float dropout mask
            out["LoRA inputs (dropped copies)"] = sum(l.fan_in for l in targets)
            out["LoRA dropout masks"] = sum(l.fan_in for l in targets)
        else:
            out["LoRA inputs"] = _distinct_inputs(targets, shape)
        out["LoRA B inputs"] = run.lora_rank * len(targets)
    else:
        out["linear inputs"] = _distinct_inputs(shape.linears, shape)
    return out


def first_layer_savings(shape: ModelShape, run: RunSetup) -> float:
    """Elements per token layer 0 does not keep under LoRA: its input (the frozen embedding's output) needs no
    gradient, so the norms reading it and the dropout of the linears reading their output save nothing."""
    if not run.lora or run.checkpointing:
        return 0.0
    h = shape.hidden
    if shape.layout == "gated":
        saved_norm = h + 1
        first = ("attn_in",)
    else:
        saved_norm = (1 if shape.parallel_residual else 2) * h + 4
        first = ("attn_in", "mlp_in") if shape.parallel_residual else ("attn_in",)
    masks = sum(l.fan_in for l in run.lora_targets if l.reads in first) if run.lora_dropout else 0
    return saved_norm + masks


def activation_bytes(shape: ModelShape, run: RunSetup) -> dict[str, int]:
    """Bytes kept for backward in one forward pass of run.pass_tokens tokens, by component."""
    tokens, e, h = run.pass_tokens, run.act_bytes, shape.hidden
    out: dict[str, int] = {}
    if run.checkpointing:
        out["decoder-layer inputs (checkpointing)"] = shape.layers * h * tokens * e
    else:
        per_layer = layer_activations(shape, run)
        for name, elements in per_layer.items():
            out[name] = int(shape.layers * elements * tokens * e)
        out["norms"] -= int(first_layer_savings(shape, run) * tokens * e)
        out["rotary cos/sin"] = 2 * shape.rotary_dims * tokens * e
        if run.attention in ("sdpa", "eager"):  # SDPA turns the block-diagonal mask into a float copy per layer
            out["attention mask (per layer)"] = shape.layers * mask_bytes(run)
    out["final norm"] = final_norm_elements(shape, run) * tokens * e
    out["token ids and loss mask"] = tokens * (1 + (0 if run.lora else 8))  # the embedding's backward needs the ids
    return out


def mask_bytes(run: RunSetup) -> int:
    """One layer's copy of the [rows, 1, T, T] attention mask in the compute dtype (float32 on CPU)."""
    return run.rows_per_pass * run.row_tokens ** 2 * run.act_bytes


def final_norm_elements(shape: ModelShape, run: RunSetup) -> int:
    h = shape.hidden
    if shape.layout == "gated":
        return 2 * h + 1 if not run.lora else h + 1
    return h + 2


def recompute_bytes(shape: ModelShape, run: RunSetup) -> int:
    """With checkpointing: one decoder layer's activations, alive while it is recomputed and back-propagated."""
    if not run.checkpointing:
        return 0
    per_token = sum(layer_activations(shape, run).values())
    mask = mask_bytes(run) if run.attention in ("sdpa", "eager") else 0
    return int(per_token * run.pass_tokens * run.act_bytes + mask)


# --- the output layer and the loss ---------------------------------------------------------------------------------
def head_saved_bytes(shape: ModelShape, run: RunSetup) -> int:
    """The fused output layer forms its gradients in the forward pass: the supervised hidden states' gradient, and
    under full fine-tuning the output layer's float32 weight gradient, kept until backward."""
    grad_hidden = run.supervised_tokens * shape.hidden * run.act_bytes
    grad_weight = 0 if run.lora else shape.vocab * shape.hidden * 4
    return grad_hidden + grad_weight


def head_chunk(run: RunSetup) -> int:
    """Supervised positions in the output layer's largest chunk."""
    return min(run.chunk_tokens, max(1, run.supervised_tokens))


def head_forward_bytes(shape: ModelShape, run: RunSetup) -> int:
    """Inside the fused output layer's forward, at its largest chunk: the chunk's float32 logits (softmaxed in place;
    a compute-dtype copy beside them when that is not float32) and the chunk's hidden-state gradient being formed."""
    chunk = head_chunk(run)
    logits = chunk * shape.vocab * (4 + (run.act_bytes if run.act_bytes != 4 else 0))
    return logits + chunk * shape.hidden * run.act_bytes


def head_backward_bytes(shape: ModelShape, run: RunSetup) -> int:
    """The output layer's backward scales its saved gradients by the incoming one into new tensors while the saved
    ones and every activation still live: one more copy of head_saved_bytes (and a cast of the weight gradient to a
    16-bit weight's dtype)."""
    cast = shape.vocab * shape.hidden * run.weight_bytes if not run.lora and run.weight_bytes != 4 else 0
    return head_saved_bytes(shape, run) + cast


# --- the optimizer step --------------------------------------------------------------------------------------------
def largest_trainable_tensor_bytes(shape: ModelShape, run: RunSetup) -> int:
    """The biggest trainable tensor: the (input) embedding under full fine-tuning, a LoRA A or B matrix otherwise."""
    if run.lora:
        return max(run.lora_rank * max(l.fan_in, l.fan_out) for l in run.lora_targets) * 4
    biggest = max([shape.vocab * shape.hidden] + [l.fan_in * l.fan_out for l in shape.linears])
    return biggest * run.weight_bytes


def optimizer_step_bytes(shape: ModelShape, run: RunSetup, shards: int = 1) -> int:
    """AdamW's temporaries in its step. Per tensor (torch's CPU default): sqrt(exp_avg_sq) and its quotient by the bias
    correction for the largest tensor, while the quotient of the tensor before it is still referenced (an untied
    output layer comes last of the weights, after the last MLP projection; a tied embedding comes first; LoRA: at
    most one more of its largest matrix). Foreach (torch's CUDA default): one sqrt per tensor, all at once."""
    if run.foreach_optimizer:
        return trainable_bytes(shape, run) // shards
    largest = largest_trainable_tensor_bytes(shape, run)
    if run.lora:
        before = largest
    else:
        before = 0 if shape.tied else shape.linears[-1].fan_in * shape.linears[-1].fan_out * run.weight_bytes
    return (2 * largest + before) // shards


# --- the engine -----------------------------------------------------------------------------------------------------
def fsdp_gathered_bytes(shape: ModelShape, run: RunSetup) -> int:
    """FSDP2 all-gathers a unit's full parameters around its forward and backward; at the end of the forward pass
    (where the peak is) only the root unit is gathered (embeddings, output layer, final norm: it is not resharded
    between forward and backward), each decoder layer having been resharded after its forward."""
    if run.engine != "fsdp":
        return 0
    return (shape.embedding_params + shape.head_params + shape.final_norm_params) * run.weight_bytes


def ddp_bucket_bytes(shape: ModelShape, run: RunSetup) -> int:
    """DDP reduces gradients in buckets that together cover every trainable parameter: one more copy of them."""
    return trainable_bytes(shape, run) if run.engine == "ddp" and run.nproc > 1 else 0


def plan_memory(shape: ModelShape, run: RunSetup) -> MemoryPlan:
    """The components and the peak, the highest of three moments: inside the output layer at the end of a forward
    pass (all activations, its largest logits chunk, or a recomputed layer under checkpointing), the start of
    backward (the output layer's gradients scaled into new tensors) and the optimizer step (all gradients and
    AdamW's temporaries). Gradients accumulated by earlier passes of the step are there at the first two."""
    shards = run.nproc if run.engine == "fsdp" else 1
    grads = trainable_bytes(shape, run)
    grads_kept = grads // shards if run.engine != "fsdp" or run.fsdp_every_pass else grads
    plan = MemoryPlan()
    plan.persistent = {
        "weights": weight_bytes(shape, run) // shards,
        "optimizer state (AdamW)": optimizer_bytes(shape, run) // shards,
        "FSDP all-gathered root unit": fsdp_gathered_bytes(shape, run),
        "DDP gradient buckets": ddp_bucket_bytes(shape, run),
        "batch tensors": run.accumulation * run.micro_batch_rows * run.row_tokens * BATCH_BYTES_PER_TOKEN,
    }
    plan.activations = activation_bytes(shape, run)
    plan.activations["output layer + loss (fused: gradients formed in forward)"] = head_saved_bytes(shape, run)
    plan.transient = {"gradients": grads_kept,
                      "output layer logits (largest chunk)": head_forward_bytes(shape, run),
                      "recomputed layer (checkpointing)": recompute_bytes(shape, run),
                      "output layer backward (scaled gradient copies)": head_backward_bytes(shape, run),
                      "AdamW step temporaries": optimizer_step_bytes(shape, run, shards)}
    several_passes = run.passes_per_step * run.accumulation > 1
    plan.gradients_before_pass = grads_kept if several_passes else 0
    base = sum(plan.persistent.values())
    kept = base + sum(plan.activations.values()) + plan.gradients_before_pass
    t = plan.transient
    moments = {
        "end of a forward pass": kept + max(t["output layer logits (largest chunk)"],
                                            t["recomputed layer (checkpointing)"]),
        "start of backward": kept + t["output layer backward (scaled gradient copies)"],
        "optimizer step": base + grads_kept + t["AdamW step temporaries"],
    }
    plan.peak_moment, plan.peak = max(moments.items(), key=lambda kv: kv[1])
    return plan
