"""Multi-task losses (case1-case4), normalized over a whole optimizer step, and supervised-only logits.

Every mode is a weighted sum of token losses, loss = sum_i c_i * l_i, where the coefficient c_i depends only
on counts over the whole optimizer step (all micro-batches, all ranks):
  case1  c = 1 / M                       (M: supervised tokens in the step)
  case2  c = 1 / (n_s * S)               (n_s: tokens of the token's sample, S: samples in the step)
  case3  c = w_t / (M_t * W)             (M_t: tokens of task t, W: sum of w over tasks present)
  case4  c = w_t / (n_s * S_t * W)       (S_t: samples of task t)
So each micro-batch contributes its share and accumulation over micro-batches or ranks changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mftcoder.data.batching import Batch

LOSS_MODES = ("case1", "case2", "case3", "case4")


def sample_groups(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the supervised tokens (loss_mask order): each token's sample index, then per sample its
    supervised-token count and its task. Samples without a supervised token do not appear."""
    mask = batch.loss_mask
    unique, inverse, counts = torch.unique(batch.token_sample[mask], return_inverse=True, return_counts=True)
    sample_task = torch.zeros(len(unique), dtype=torch.long, device=mask.device)
    sample_task[inverse] = batch.token_task[mask]
    return inverse, counts, sample_task


@dataclass
class StepCounts:
    """Per-task supervised tokens and samples over one optimizer step (all micro-batches; all ranks once reduced)."""

    tokens: torch.Tensor  # [num_tasks] float64
    samples: torch.Tensor  # [num_tasks] float64

    @staticmethod
    def of(batches: list[Batch], num_tasks: int) -> "StepCounts":
        tokens = torch.zeros(num_tasks, dtype=torch.float64)
        samples = torch.zeros(num_tasks, dtype=torch.float64)
        for batch in batches:
            tokens += torch.bincount(batch.token_task[batch.loss_mask].cpu(), minlength=num_tasks).double()
            samples += torch.bincount(sample_groups(batch)[2].cpu(), minlength=num_tasks).double()
        return StepCounts(tokens, samples)


def token_coefficients(batch: Batch, mode: str, counts: StepCounts, task_weights: torch.Tensor) -> torch.Tensor:
    """c_i for each supervised token of the batch (in loss_mask order), from step-level counts."""
    inverse, per_sample, _ = sample_groups(batch)
    return unit_coefficients(batch.token_task[batch.loss_mask], per_sample[inverse], mode, counts, task_weights)


def unit_coefficients(task: torch.Tensor, sample_size: torch.Tensor, mode: str, counts: StepCounts,
                      task_weights: torch.Tensor) -> torch.Tensor:
    """The coefficient of each loss unit (a supervised token; for a preference objective a pair, its own sample of
    size 1) from its task, the size of its sample and the step's counts of units and samples per task."""
    device = task.device
    tokens, samples = counts.tokens.to(device), counts.samples.to(device)
    weights = task_weights.to(device=device, dtype=torch.float64)
    sample_tokens = sample_size.to(device).double()
    if mode == "case1":
        return torch.ones_like(sample_tokens) / tokens.sum()
    if mode == "case2":
        return 1.0 / (sample_tokens * samples.sum())
    present_weight = weights[tokens > 0].sum()
    if present_weight == 0:  # only zero-weight tasks in this step: nothing to learn from it
        return torch.zeros_like(sample_tokens)
    if mode == "case3":
        return weights[task] / (tokens[task] * present_weight)
    if mode == "case4":
        return weights[task] / (sample_tokens * samples[task] * present_weight)
    raise ValueError(f"unknown weighted_loss_mode {mode!r}")


@dataclass
class PassStats:
    """What one forward pass measured, per sample (an SFT sequence, a preference pair): its task, its summed loss,
    its size in loss units (supervised tokens; 1 for a pair), and the objective's extra metrics (summed per task,
    reported as means over samples)."""

    task: torch.Tensor  # [S] long
    loss_sum: torch.Tensor  # [S] float64
    size: torch.Tensor  # [S] float64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S] float64

    @staticmethod
    def of_tokens(batch: Batch, token_losses: torch.Tensor) -> "PassStats":
        """Per-sequence sums of token losses (in loss_mask order)."""
        inverse, per_sample, sample_task = (t.cpu() for t in sample_groups(batch))
        losses = token_losses.detach().double().cpu()
        sample_loss = torch.zeros(len(per_sample), dtype=torch.float64).index_add_(0, inverse, losses)
        return PassStats(sample_task, sample_loss, per_sample.double())


@dataclass
class TaskTotals:
    """Running sums per task: losses, loss units (tokens), per-sample mean losses, samples, and the objective's extra
    metrics (for logs and evaluation)."""

    loss_sum: torch.Tensor
    tokens: torch.Tensor
    sample_mean_sum: torch.Tensor
    samples: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def zeros(num_tasks: int, extras: tuple[str, ...] = ()) -> "TaskTotals":
        parts = [torch.zeros(num_tasks, dtype=torch.float64) for _ in range(4 + len(extras))]
        return TaskTotals(*parts[:4], dict(zip(extras, parts[4:])))

    def add(self, batch: Batch, token_losses: torch.Tensor) -> None:
        """Accumulate detached token losses (in loss_mask order) of one batch."""
        self.add_stats(PassStats.of_tokens(batch, token_losses))

    def add_stats(self, stats: PassStats) -> None:
        num_tasks = len(self.tokens)
        task, loss = stats.task.cpu(), stats.loss_sum.detach().double().cpu()
        size = stats.size.double().cpu()
        self.loss_sum += torch.bincount(task, weights=loss, minlength=num_tasks)
        self.tokens += torch.bincount(task, weights=size, minlength=num_tasks)
        self.sample_mean_sum += torch.bincount(task, weights=loss / size, minlength=num_tasks)
        self.samples += torch.bincount(task, minlength=num_tasks).double()
        for name, values in stats.extras.items():
            self.extras[name] += torch.bincount(task, weights=values.detach().double().cpu(), minlength=num_tasks)

    def merge(self, other: "TaskTotals") -> None:
        for mine, theirs in zip(self.as_tensor_parts(), other.as_tensor_parts()):
            mine.add_(theirs)

    def as_tensor_parts(self) -> tuple[torch.Tensor, ...]:
        return (self.loss_sum, self.tokens, self.sample_mean_sum, self.samples, *self.extras.values())

    def as_tensor(self) -> torch.Tensor:
        return torch.stack(self.as_tensor_parts())

    def zeros_like(self) -> "TaskTotals":
        return TaskTotals.zeros(len(self.tokens), tuple(self.extras))

    def from_tensor(self, t: torch.Tensor) -> "TaskTotals":
        """Totals of the same shape as these (the same extras) from a tensor as_tensor() made, e.g. summed over ranks."""
        parts = t.clone()
        return TaskTotals(*parts[:4], dict(zip(self.extras, parts[4:])))

    def per_task_loss(self) -> torch.Tensor:
        """Token-mean loss per task (NaN where a task had no token)."""
        return self.loss_sum / self.tokens

    def objective(self, mode: str, task_weights: torch.Tensor) -> float:
        """The training objective evaluated over everything accumulated (used for the validation loss)."""
        w = task_weights.double()
        present = self.tokens > 0
        if not present.any():
            return float("nan")
        if mode == "case1":
            return float(self.loss_sum.sum() / self.tokens.sum())
        if mode == "case2":
            return float(self.sample_mean_sum.sum() / self.samples.sum())
        per_task = (self.loss_sum / self.tokens) if mode == "case3" else (self.sample_mean_sum / self.samples)
        return float((w[present] * per_task[present]).sum() / w[present].sum())

    def extra_metrics(self, task_names: list[str]) -> dict[str, float]:
        """Each extra metric's mean over samples, overall and per task (`name/task`; tasks without samples left out)."""
        metrics = {}
        for name, sums in self.extras.items():
            if self.samples.sum() > 0:
                metrics[name] = float(sums.sum() / self.samples.sum())
            metrics.update({f"{name}/{task}": float(sums[i] / self.samples[i])
                            for i, task in enumerate(task_names) if self.samples[i] > 0})
        return metrics


class SupervisedLM(nn.Module):
    """Wraps a causal LM: runs its body, then the output layer and cross-entropy only at supervised positions.

    fused_head: the output layer is fused with the cross-entropy, in chunks, so [tokens, vocab] logits are never
    built; only valid where the logits are exactly the output layer of the last hidden state. Otherwise (logit
    soft-capping or scaling, a router loss) the model's own forward gives the logits at the supervised positions
    (`logits_to_keep`), and its auxiliary loss, if any, is added with the model's coefficient."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024, fused_head: bool = True, flat_packing: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.fused_head = fused_head
        self.flat_packing = flat_packing  # packed rows go in as one row (kernels that isolate samples only then)

    def body(self) -> nn.Module:
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return inner.base_model

    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, batch: Batch, coefficients: torch.Tensor | None = None, aux_scale: float = 1.0,
                keep_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of coefficient * token loss [+ aux_scale * the model's weighted auxiliary loss], to backpropagate)
        and the per-token cross-entropy (float32) at the supervised positions, in loss_mask order: detached, or with
        `keep_graph` part of the graph (for a loss that is not linear in them, such as DPO's; the output layer's
        logits are then recomputed chunk by chunk in backward instead of fused)."""
        if batch.position_ids is not None and self.flat_packing:
            batch = batch.flattened()
        layout = model_layout(batch, boundaries=self.flat_packing)
        targets = batch.targets[batch.loss_mask]
        if coefficients is None:
            coefficients = torch.zeros(len(targets), device=targets.device)
        if not self.fused_head:
            total, losses = self._model_logits_loss(batch, layout, targets, coefficients, aux_scale)
            return total, losses if keep_graph else losses.detach()
        hidden = self.body()(input_ids=batch.input_ids, use_cache=False, **layout).last_hidden_state
        selected, head = hidden[batch.loss_mask], self.head()
        if type(head) is nn.Linear and not keep_graph:  # the usual output layer: fused, no logits kept for backward
            return fused_linear_cross_entropy(selected, head.weight, head.bias, targets, coefficients.float(),
                                              self.chunk_tokens)
        pieces = []  # e.g. an adapter on the output layer: recompute each chunk's logits in backward
        for start in range(0, max(1, len(selected)), self.chunk_tokens):  # an empty chunk keeps the graph whole
            h, t = selected[start:start + self.chunk_tokens], targets[start:start + self.chunk_tokens]
            pieces.append(checkpoint(_head_loss, head, h, t, use_reentrant=False) if torch.is_grad_enabled()
                          else _head_loss(head, h, t))
        losses = torch.cat(pieces)
        return (losses * coefficients.to(losses.dtype)).sum(), losses if keep_graph else losses.detach()

    def _model_logits_loss(self, batch: Batch, layout: dict, targets: torch.Tensor, coefficients: torch.Tensor,
                           aux_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        columns = batch.loss_mask.any(0)  # every position supervised in some row; logits only there
        out = self.model(input_ids=batch.input_ids, use_cache=False, logits_to_keep=columns.nonzero().squeeze(1),
                         **layout)
        rows, positions = batch.loss_mask.nonzero(as_tuple=True)  # row-major: loss_mask order
        logits = out.logits[rows, (columns.cumsum(0) - 1)[positions]]
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        total = (losses * coefficients.to(losses.dtype)).sum()
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            total = total + aux_scale * self.model.config.router_aux_loss_coef * aux
        return total, losses


def model_layout(batch: Batch, boundaries: bool = False) -> dict:
    """How a batch's rows are told apart to the model: padded rows by their attention mask; packed rows by position
    ids that restart at every sample and no mask (transformers then builds a per-row block-diagonal mask). With
    `boundaries` (a flattened row for flash-attention) also the samples' cumulative lengths, which flash-attention
    would otherwise work out from the position ids in every layer (a device sync each)."""
    if batch.position_ids is None:
        return {"attention_mask": batch.attention_mask}
    layout = {"position_ids": batch.position_ids, "attention_mask": None}
    if boundaries and batch.position_ids.shape[0] == 1:
        positions = batch.position_ids[0]
        starts = (positions == 0).nonzero().squeeze(1)
        bounds = torch.cat([starts, starts.new_tensor([len(positions)])]).to(torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max())
        layout.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    return layout


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, coefficients: torch.Tensor,
                               chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i c_i * CE(W h_i + b, y_i) and the token losses; without autograd (evaluation) no gradient is formed."""
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, coefficients, chunk_tokens)
    losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(targets), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        _, _, losses[chunk] = _chunk_cross_entropy(hidden[chunk], weight, bias, targets[chunk])
    return (losses.double() * coefficients.double()).sum().float(), losses


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits of one chunk, their log-normalizer and the token cross-entropies."""
    logits = F.linear(hidden, weight, bias).float()
    log_norm = torch.logsumexp(logits, dim=1)
    return logits, log_norm, log_norm - logits.gather(1, targets[:, None]).squeeze(1)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i c_i * CE(W h_i + b, y_i), computed chunk by chunk; the gradients for h, W and b are
    formed in the forward pass from each chunk's softmax (c_i * (softmax - onehot)), so neither the
    [tokens, vocab] logits nor a recomputation are needed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coefficients, chunk_tokens):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        # The matmuls' dtype: autocast's where it is on (bf16 on GPU), else the weight's. The weight is cast once for
        # every chunk (no copy when it already has that dtype; never a float32 copy of a bf16 weight).
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else weight.dtype
        weight_c = weight.to(compute)
        for start in range(0, len(targets), chunk_tokens):
            end = min(start + chunk_tokens, len(targets))
            h, y = hidden[start:end], targets[start:end]
            logits, log_norm, losses[start:end] = _chunk_cross_entropy(h.to(compute), weight_c, bias, y)
            grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place
            grad_logits[torch.arange(end - start, device=y.device), y] -= 1.0
            grad_logits.mul_(coefficients[start:end, None])
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(compute) @ weight_c).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(losses)
        return (losses.double() * coefficients.double()).sum().float(), losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if present else None for present in ctx.present]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return grads[0], grads[1], grads[2], None, None, None
