"""What to change when a run does not fit: each change applied to the config and planned again, cheapest in speed
first, with the peak it predicts."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mftcoder.config import Config
from mftcoder.plan.shape import ModelShape

if TYPE_CHECKING:
    from mftcoder.plan.planner import Plan, Target


def candidates(config: Config, target: "Target", plan: "Plan") -> list[tuple[str, Config, "Target"]]:
    """The changes, in order of their cost in speed: smaller passes (none on CPU), checkpointing (a third more
    compute), more FSDP ranks (communication), LoRA (fewer weights learn), QLoRA (dequantization), shorter rows."""
    run, out = plan.run, []
    change = lambda **kw: dataclasses.replace(config, **kw)  # noqa: E731
    if run.rows_per_pass > 1:
        rows = max(1, run.rows_per_pass // 4)
        out.append((f"max_forward_tokens={rows * run.row_tokens} (passes of {rows} row(s))",
                    change(max_forward_tokens=rows * run.row_tokens), target))
    if not run.checkpointing:
        out.append(("checkpoint_activations=true (about a third more compute)", change(checkpoint_activations=True),
                    target))
    if not config.quantization:
        for ranks in (2, 4, 8, 16, 32, 64):
            if ranks > target.nproc:
                out.append((f"distributed_strategy=fsdp on {ranks} ranks (--nproc {ranks})",
                            change(distributed_strategy="fsdp"), dataclasses.replace(target, nproc=ranks)))
    if run.method == "full":
        out.append(("peft_type=lora (train adapters only)", change(peft_type="lora"), target))
    if not config.quantization:
        out.append(("peft_type=lora quantization=nf4 (QLoRA: 4-bit frozen base, dequantized per matmul)",
                    change(peft_type="lora", quantization="nf4", distributed_strategy="ddp",
                           checkpoint_activations=True), target))
    if config.seq_length > 512:
        out.append((f"seq_length={config.seq_length // 2} (longer samples are cut or dropped)",
                    change(seq_length=config.seq_length // 2), target))
    return out


def advise(config: Config, shape: ModelShape, target: "Target", plan: "Plan") -> list[tuple[str, int]]:
    """(change, its predicted device peak) for the changes that fit, cheapest first; when none fits alone, every
    change with its peak, and the combination of all of them last."""
    from mftcoder.plan.planner import peak_for

    if plan.fits is not False:
        return []
    fraction = plan.run.supervised_fraction
    tried = [(text, peak_for(variant, shape, tgt, fraction)) for text, variant, tgt in candidates(config, target, plan)]
    fitting, seen_fsdp = [], False
    for text, peak in tried:
        if peak <= target.memory_bytes and not (seen_fsdp and "fsdp" in text):
            fitting.append((text, peak))
            seen_fsdp = seen_fsdp or "fsdp" in text  # the fewest ranks that fit is enough
    if fitting:
        return fitting
    best = dataclasses.replace(config, peft_type="lora", quantization="nf4", checkpoint_activations=True,
                               distributed_strategy="ddp", max_forward_tokens=plan.run.row_tokens)
    everything = ("all of: QLoRA nf4, checkpoint_activations, passes of one row", peak_for(best, shape, target, fraction))
    return [t for t in tried if "fsdp" not in t[0] or t[0].endswith("(--nproc 64)")] + [everything]
