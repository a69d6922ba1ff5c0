"""Run by tests/test_distributed.py under torchrun (2 ranks, FSDP2 on gloo): one optimizer step's gradients where the
ranks' micro-batches have different widths, so max_forward_tokens splits them into different numbers of passes (rank 0:
one, rank 1: two). Each pass is a collective under FSDP2; the ranks must still finish, with the gradients one process
gets from both micro-batches. Writes argv[1]/grads.safetensors (rank 0) and argv[1]/passes-N.json."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

MAX_FORWARD_TOKENS = 30  # rank 0's rows are 10 wide (3 rows a pass), rank 1's 40 wide (1 row a pass)
ROW_LENGTHS = {0: (10, 8), 1: (40, 20)}


def tiny_model() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mftcoder.model import read_model_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("tiny-test")),
                                            attn_implementation="sdpa")


def micro_batch(rank: int):
    from mftcoder.data.batching import collate

    rng = np.random.default_rng(rank)
    rows = [[(rng.integers(3, 1000, n).astype(np.int32), np.ones(n, dtype=np.uint8), rank)] for n in ROW_LENGTHS[rank]]
    return collate(rows, 0)


def step_gradients(runner, model, batches, parallel) -> dict[str, torch.Tensor]:
    """accumulate_gradients as the trainer runs it (case1, step-level counts over all ranks); the full gradients."""
    from mftcoder.loss import StepCounts, TaskTotals
    from mftcoder.objectives.sft import SupervisedFineTuning
    from mftcoder.train.loop import accumulate_gradients

    counts = StepCounts.of(batches, 2)
    counts = StepCounts(*parallel.env.all_reduce_sum(torch.stack([counts.tokens, counts.samples])))
    accumulate_gradients(runner, batches, SupervisedFineTuning(), counts, "case1", torch.ones(2), parallel, TaskTotals.zeros(2),
                         contextlib.nullcontext(), MAX_FORWARD_TOKENS)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return grads


def main() -> None:
    from safetensors.torch import save_file

    from mftcoder.loss import SupervisedLM
    from mftcoder.train.distributed import FullyShard, OptimizerSpec, init_distributed, shutdown

    out = Path(sys.argv[1])
    env = init_distributed()
    model = tiny_model()
    parallel = FullyShard(env)
    runner, _ = parallel.prepare(SupervisedLM(model), model, OptimizerSpec(0.0, {"lr": 1e-3}))
    batch = micro_batch(env.rank)
    (out / f"passes-{env.rank}.json").write_text(json.dumps(len(batch.split_rows(MAX_FORWARD_TOKENS))))
    grads = step_gradients(runner, model, [batch], parallel)
    if env.is_main:
        save_file(grads, str(out / "grads.safetensors"))
    del runner, model
    shutdown(env)


if __name__ == "__main__":
    main()
