#!/usr/bin/env python
"""Where a training step's memory goes, by component: one LoRA (or full) step of a real model on one packed batch.

    python bench/memory.py --model models/SmolLM2-135M-Instruct              # LoRA r=8, 8 rows x 512, defaults
    python bench/memory.py --model ... --max-forward-tokens 0 --lora-dropout 0.05

Counts, in one process: the weights; trainable parameters, their gradients and AdamW state; and every tensor
autograd keeps for backward (hooked with torch.autograd.graph.saved_tensors_hooks, each storage counted once),
attributed to the innermost module that was running (attention, MLP, norm, LoRA dropout/inputs, loss). Peak RSS
is the process's maximum resident memory after the step; it includes the allocator's fragmentation, which the
live-tensor counts do not. With --max-forward-tokens the batch runs in passes of that many tokens, as mftcoder does.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
GROUPS = {  # innermost module class name -> component
    "Dropout": "LoRA dropout (mask + dropped copy of the input)", "Identity": "LoRA input",
    "SiLUActivation": "MLP activation", "LlamaMLP": "MLP (gate/up products)", "LlamaAttention": "attention",
    "LlamaRMSNorm": "norms", "Embedding": "embeddings", "<loss>": "output layer + loss (supervised rows)",
}


def component(module_name: str, tensor: torch.Tensor, lora_rank: int) -> str:
    if module_name == "Linear":  # a LoRA Linear saves its input for its weight gradient
        return "LoRA A/B inputs" if lora_rank and lora_rank in tensor.shape else "inputs of the LoRA A layers (the dropped copy when lora_dropout > 0)"
    if module_name == "LlamaAttention" and tensor.dim() == 4 and tensor.shape[-1] == tensor.shape[-2]:
        return "attention mask (per layer)"
    return GROUPS.get(module_name, module_name)


def packed_rows(rows: int, width: int, seed: int = 0) -> list:
    """Rows of random token samples (60% supervised), 64-300 tokens each, packed to `width`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row, left = [], width
        while left > 16:
            n = min(left, int(rng.integers(64, 300)))
            row.append((rng.integers(100, 40000, n).astype(np.int32), (rng.random(n) < 0.6).astype(np.uint8), 0))
            left -= n
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=8")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--max-forward-tokens", type=int, default=None, help="default: mftcoder's (1024 on CPU)")
    parser.add_argument("--checkpoint-activations", action="store_true")
    args = parser.parse_args(argv)

    from mftcoder.config import build_config, forward_token_limit
    from mftcoder.data.batching import collate
    from mftcoder.loss import SupervisedLM
    from mftcoder.model import load_base_model, load_tokenizer, parameter_groups, prepare_for_training

    values = {"pretrained_model_path": str(args.model), "chat_template": "model", "lora_dropout": args.lora_dropout,
              "checkpoint_activations": args.checkpoint_activations, "max_forward_tokens": args.max_forward_tokens}
    if not args.full:
        values.update(peft_type="lora", lora_rank=8, lora_alpha=16)
    config, _ = build_config(values)
    tokenizer, template = load_tokenizer(config)
    model = prepare_for_training(load_base_model(config, tokenizer, template), config).train()
    runner = SupervisedLM(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-5)
    batch = collate(packed_rows(args.rows, args.seq_length), tokenizer.pad_token_id, packed=True)
    pieces = batch.split_rows(forward_token_limit(config, "cpu"))

    stack: list[str] = []

    def enter(module: torch.nn.Module, inputs) -> None:
        stack.append(type(module).__name__)

    def leave(module: torch.nn.Module, inputs, output) -> None:
        stack.pop()

    for module in model.modules():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    saved: collections.Counter = collections.Counter()
    weight_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}  # counted as weights
    seen: set[int] = set()
    peak_saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in weight_storages:
            seen.add(storage.data_ptr())
            saved[component(stack[-1] if stack else "<loss>", t, 0 if args.full else 8)] += storage.nbytes()
        return t

    started = time.perf_counter()
    for piece in pieces:  # like accumulate_gradients: each pass's activations are freed by its backward
        seen.clear()  # (a storage freed in an earlier pass may be reused at the same address)
        before = sum(saved.values())
        coefficients = torch.full((int(piece.loss_mask.sum()),), 1e-3)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = runner(piece, coefficients)
        peak_saved[0] = max(peak_saved[0], sum(saved.values()) - before)
        loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    gib = 2 ** 30
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * 4 for p in trainable)
    adam = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    passes = len(pieces)
    print(f"model {args.model.name}, {'full' if args.full else 'LoRA r=8'}, {args.rows} rows x {args.seq_length} "
          f"packed, lora_dropout {args.lora_dropout}, {passes} pass(es) of {pieces[0].input_ids.numel()} tokens, "
          f"checkpoint_activations {args.checkpoint_activations}")
    print("| component | GiB |\n|---|---:|")
    print(f"| weights (parameters + buffers) | {(params + buffers) / gib:.3f} |")
    print(f"| gradients of trainable parameters ({sum(p.numel() for p in trainable) / 1e6:.2f}M) | {grads / gib:.3f} |")
    print(f"| AdamW state | {adam / gib:.3f} |")
    per_pass = 1 / passes
    for name, nbytes in saved.most_common():
        print(f"| kept for backward, per pass: {name} | {nbytes * per_pass / gib:.3f} |")
    print(f"| **kept for backward, largest pass** | **{peak_saved[0] / gib:.3f}** |")
    print(f"| peak RSS of the process (incl. ~0.3 GiB of imports, allocator fragmentation) | {peak_rss / gib:.2f} |")
    print(f"step time {seconds:.1f} s (first step: includes warm-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
