"""The plan as text (one table, a verdict, advice) and as JSON (every key carries its unit: _bytes, _s, _flops)."""

from __future__ import annotations

from mftcoder.plan.memory import GIB
from mftcoder.plan.planner import Plan, describe_method


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def total_seconds(plan: Plan) -> float | None:
    steps = plan.schedule.total_steps
    return None if steps is None else steps * plan.step_seconds


def verdict(plan: Plan) -> str:
    name, size = plan.memory.largest()
    largest = f"largest component: {name} ({gib(size)})"
    if plan.fits is None:
        return f"peak {gib(plan.device_peak)} per rank ({largest}); give --device-memory for a verdict"
    room = f"{gib(plan.target.memory_bytes)} per {'GPU' if plan.target.device == 'cuda' else 'process'}"
    if plan.fits:
        return f"fits: {gib(plan.device_peak)} of {room} ({largest})"
    return f"does not fit: {gib(plan.device_peak)} needed, {room} ({largest})"


def render(plan: Plan) -> str:
    s, run, mem = plan.shape, plan.run, plan.memory
    lines = [f"model: {s.model_type}, {s.params / 1e9:.3g}B parameters ({s.layers} layers, hidden {s.hidden}, "
             f"vocab {s.vocab}{', tied' if s.tied else ''}); {describe_method(plan)}",
             f"run: {plan.target.nproc} rank(s) on {plan.target.device}, engine {run.engine}; passes of "
             f"{run.rows_per_pass} row(s) x {run.row_tokens} tokens, {run.passes_per_step * run.accumulation} pass(es) "
             f"per step; checkpoint_activations {str(run.checkpointing).lower()}",
             "", "| memory per rank | GiB |", "|---|---:|"]
    for name, size in mem.components().items():
        if size:
            lines.append(f"| {name} | {size / GIB:.3f} |")
    lines += [f"| **peak of the training tensors** ({mem.peak_moment}) | **{mem.peak / GIB:.3f}** |",
              f"| runtime and allocator overhead | {plan.overhead_bytes / GIB:.3f} |",
              f"| **peak per rank** | **{plan.device_peak / GIB:.3f}** |", ""]
    sched = plan.schedule
    lines += [f"time: {sched.tokens_per_step:,} tokens per step, {plan.flops_per_step:.3g} matmul FLOPs per rank per "
              f"step, {duration(plan.step_seconds)} per step ({plan.rate_source})", "", "| step time term | s |",
              "|---|---:|"]
    lines += [f"| {name.removesuffix('_s').replace('_', ' ')} | {seconds:.3f} |"
              for name, seconds in plan.time_terms.items() if seconds]
    lines += [f"| **step** | **{plan.step_seconds:.3f}** |", "",
              f"steps: {sched.steps_per_epoch or 'unknown'} per epoch, {sched.total_steps or 'unknown'} in all, "
              f"about {duration(total_seconds(plan))} ({sched.note})", "", verdict(plan)]
    if plan.advice:
        lines.append("to make it fit, cheapest in speed first (each alone, with its peak per rank):")
        lines += [f"  - {text}: {gib(peak)}" for text, peak in plan.advice]
    return "\n".join(lines)


def as_json(plan: Plan) -> dict:
    mem, sched = plan.memory, plan.schedule
    key = lambda name: name.split(" (")[0].replace(":", "").replace(" + ", "_").replace(" ", "_").replace(",", "")  # noqa: E731
    return {
        "model_type": plan.shape.model_type, "parameters": plan.shape.params, "method": plan.run.method,
        "device": plan.target.device, "nproc": plan.target.nproc, "engine": plan.run.engine,
        "components_bytes": {key(k): v for k, v in mem.components().items()},
        "tensor_peak_bytes": mem.peak, "peak_moment": mem.peak_moment, "overhead_bytes": plan.overhead_bytes,
        "peak_bytes": plan.device_peak, "device_memory_bytes": plan.target.memory_bytes, "fits": plan.fits,
        "largest_component": mem.largest()[0], "verdict": verdict(plan),
        "tokens_per_step": sched.tokens_per_step, "step_flops": plan.flops_per_step,
        "step_time_terms_s": dict(plan.time_terms), "step_time_s": plan.step_seconds, "rates": plan.rate_source,
        "steps_per_epoch": sched.steps_per_epoch, "total_steps": sched.total_steps, "total_time_s": total_seconds(plan),
        "schedule_note": sched.note,
        "advice": [{"change": text, "peak_bytes": peak} for text, peak in plan.advice],
    }
