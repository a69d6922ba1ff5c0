"""atorch_strategy as the config reads it: the ATorch strategies mftcoder runs (and where), and each entry parsed to
(name, settings). Names and shapes only (no torch, no ATorch), so the config validates them without importing the
engine (mftcoder/train/atorch_engine.py, which checks the rest against the device and the run)."""

from __future__ import annotations

import difflib
from typing import Any

from mftcoder.config_text import ConfigError

# What mftcoder runs through ATorch, and where (measured on CPU with 2 ranks; see README "ATorch").
CPU_AND_GPU = ("parallel_mode", "zero1", "checkpoint")
GPU_ONLY = {"fsdp": "ATorch's fsdp refuses CPU ('FSDP only support GPU')",
            "zero2": "on CPU ATorch's zero2 is fairscale's ShardedDataParallel, whose gradients were measured wrong "
                     "from the second step under torch 2.13",
            "amp_native": "ATorch's amp_native is CUDA autocast; on CPU it does nothing (bf16: true is mftcoder's own)"}
NOT_INTEGRATED = ("amp_apex_o1", "amp_apex_o2", "fsdp2", "auto_ddp", "fp8", "tensor_parallel", "module_replace",
                  "native_dynamo", "pipeline_parallel", "mixed_parallel", "sequence_parallel", "half", "ds_3d_parallel")


def parse_strategy(entries: list) -> list[tuple[str, Any]]:
    """atorch_strategy entries ('name' or [name, config]) as (name, config) pairs; unknown names get the closest."""
    parsed = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (list, tuple)) and len(entry) in (1, 2) and isinstance(entry[0], str):
            name, settings = entry[0], entry[1] if len(entry) == 2 else None
        elif isinstance(entry, str):
            name, settings = entry, None
        else:
            raise ConfigError(f"atorch_strategy[{i}]: expected a name or [name, config], got {entry!r}")
        known = [*CPU_AND_GPU, *GPU_ONLY]
        if name in NOT_INTEGRATED:
            raise ConfigError(f"atorch_strategy[{i}]: {name!r} is an ATorch strategy mftcoder does not run "
                              f"(supported: {', '.join(known)})")
        if name not in known:
            match = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"atorch_strategy[{i}]: unknown strategy {name!r}"
                              + (f"; did you mean {match[0]!r}?" if match else f" (supported: {', '.join(known)})"))
        parsed.append((name, settings))
    return parsed
