#!/usr/bin/env python
"""The reference model of DPO, three ways, measured on SmolLM2-135M-Instruct with mftcoder's trainer.

    python bench/dpo_reference.py                     # 2 interleaved rounds of copy, cached, lora
    python bench/dpo_reference.py --rounds 1 --steps 4 --threads 1

- copy   (full fine-tuning): a frozen deep copy of the model, in eval mode, runs a no-grad forward through mftcoder's
         SupervisedLM on every pass to give the reference log-probs. mftcoder does not offer this: the benchmark swaps
         it in for the objective's reference (mftcoder.objectives.preference.make_reference) in its own process.
- cached (full fine-tuning): mftcoder's own choice: every pair's reference log-probs computed once, by the model
         before its first update, before training starts (reference_logps.npz); each pass reads them from the batch.
- lora   (LoRA r 8 / alpha 16 / dropout 0, all Llama projections): mftcoder's choice with an adapter: the reference is
         the same model with the adapter disabled, a second no-grad forward on every pass.

Each variant runs in a fresh process: 32 pairs of the demo code_generation task (<= 256 tokens each side), batches of
8 pairs (dynamic padding), one warm-up step, `--steps` timed steps, then one step under mftcoder's TensorBytes meter
(peak bytes of live tensors: weights, gradients, AdamW state, the copy, activations). Also peak RSS, and for `cached`
the time of the precompute pass (its one-off cost) and for `copy` the time to make the copy. Rounds run interleaved
(copy, cached, lora, copy, ...) so that other load hits all alike. Ratios are to `cached`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_common as common  # noqa: E402
from dpo_vs_trl import mftcoder_config  # noqa: E402  (the same mftcoder settings as the TRL comparison)

VARIANTS = ("copy", "cached", "lora")
DESCRIPTIONS = {
    "copy": "full FT, frozen copy run every pass (benchmark only)",
    "cached": "full FT, log-probs cached before training (mftcoder)",
    "lora": "LoRA, adapter disabled for the reference (mftcoder)",
}


class FrozenCopyReference:
    """A frozen copy of the model as it is now (before the first update): eval mode, no gradients; called like the
    objective's reference (runner, batch) -> each supervised token's log-prob, in loss_mask order."""

    def __init__(self, model, runner):
        import torch
        from mftcoder.loss import SupervisedLM

        self.torch = torch
        frozen = copy.deepcopy(model).eval()
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        inner = getattr(runner, "module", runner)  # the SupervisedLM, if an engine wrapped it
        self.runner = SupervisedLM(frozen, getattr(inner, "chunk_tokens", 1024), getattr(inner, "fused_head", True),
                                   getattr(inner, "flat_packing", False))

    def __call__(self, runner, batch):
        with self.torch.no_grad():
            _, token_losses = self.runner(batch)
        return -token_losses


def worker(spec: dict) -> dict:
    import mftcoder.objectives.preference as preference
    import mftcoder.objectives.reference as reference
    from mftcoder.train.distributed import DistEnv
    from mftcoder.train.loop import Trainer
    from mftcoder.train.memory_meter import TensorBytes

    one_off: dict[str, float] = {}
    compute_tables = reference.compute_tables

    def timed_tables(config, parts):
        started = time.perf_counter()
        try:
            return compute_tables(config, parts)
        finally:
            one_off["precompute_s"] = time.perf_counter() - started

    reference.compute_tables = timed_tables
    if spec["variant"] == "copy":
        def frozen_copy(config, parts):
            started = time.perf_counter()
            made = FrozenCopyReference(parts.model, parts.runner)
            one_off["copy_s"] = time.perf_counter() - started
            return made

        preference.make_reference = frozen_copy
    steps = spec["steps"] + 2
    started = time.perf_counter()
    trainer = Trainer(mftcoder_config(spec, steps), DistEnv())
    result = {"setup_s": time.perf_counter() - started, **one_off,
              "reference": type(trainer.objective.reference).__name__}
    clock = common.StepClock(steps, TensorBytes)
    run, started = common.timed_run(trainer, clock)
    result.update(clock.summary(started), step_losses=run.step_losses, tokens_seen=run.tokens_seen,
                  pairs=sum(len(t.data) for t in trainer.data.per_task))
    return result


def report(rounds: list[dict[str, dict]], args, minutes: float) -> str:
    lines = ["| round | variant | set-up s | one-off reference s | first step s | median step s | steps timed | "
             "peak live tensors GiB | of which at step start | peak RSS GiB | other load (cores) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, runs in enumerate(rounds, 1):
        for name, r in runs.items():
            once = r.get("precompute_s", r.get("copy_s"))
            lines.append(f"| {k} | {name} | {r['setup_s']:.1f} | {'-' if once is None else f'{once:.1f}'} | "
                         f"{r['first_step_s']:.1f} | {common.median(r['step_s']):.2f} | {len(r['step_s'])} | "
                         f"{common.gib(r['meter_peak'])} | {common.gib(r['meter_start'])} | "
                         f"{common.gib(r['peak_rss'])} | {r['others']:.2f} |")
    lines += ["", "Ratios to `cached` (per round, then the median over rounds):", "",
              "| variant | time per step | peak live tensors | growth within the step (peak − start) | peak RSS | "
              "what it is |", "|---|---:|---:|---:|---:|---|"]

    def ratios(r: dict, base: dict) -> tuple:
        return (common.median(r["step_s"]) / common.median(base["step_s"]), r["meter_peak"] / base["meter_peak"],
                (r["meter_peak"] - r["meter_start"]) / (base["meter_peak"] - base["meter_start"]),
                r["peak_rss"] / base["peak_rss"])

    for name in rounds[0]:
        per_round = [ratios(runs[name], runs["cached"]) for runs in rounds if "cached" in runs]
        if not per_round:
            continue
        cells = []
        for i in range(4):
            cell = " / ".join(f"{r[i]:.2f}" for r in per_round)
            if len(per_round) > 1:
                cell += f" (median {common.median([r[i] for r in per_round]):.2f})"
            cells.append(cell)
        lines.append(f"| {name} | {' | '.join(cells)} | {DESCRIPTIONS[name]} |")
    cached = [runs["cached"] for runs in rounds if "cached" in runs]
    if cached:
        costs = [r["precompute_s"] / common.median(r["step_s"]) for r in cached]
        per_pair = [(r["precompute_s"] / r["pairs"]) / (common.median(r["step_s"]) / 8) for r in cached]
        lines += ["", f"- `cached`: the precompute pass over all {cached[0]['pairs']} pairs took "
                  + " / ".join(f"{r['precompute_s']:.1f} s" for r in cached) + " = "
                  + " / ".join(f"{c:.2f}" for c in costs) + " median training steps (of 8 pairs); per pair, "
                  + " / ".join(f"{c:.2f}" for c in per_pair) + " of a training step's time per pair."]
    pairs_ab = [(runs["copy"]["step_losses"], runs["cached"]["step_losses"]) for runs in rounds
                if "copy" in runs and "cached" in runs]
    if pairs_ab:
        gap = max(abs(x - y) for a, b in pairs_ab for x, y in zip(a, b))
        lines.append(f"- Same objective: the largest difference between `copy`'s and `cached`'s step losses (same "
                     f"batches, same steps) is {gap:.1e}; step 1: " + ", ".join(
                         f"{name} {runs[name]['step_losses'][0]:.7f}" for runs in rounds[:1] for name in runs) + ".")
    lines.append(f"- Benchmark wall time: {minutes:.1f} minutes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = common.worker_spec(argv)
    if spec is not None:
        common.finish_worker(spec, worker(spec))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (6: with the first and the metered one, two "
                                                             "epochs of the 32 pairs)")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-6, help="full fine-tuning; LoRA uses 1e-4")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every worker")
    parser.add_argument("--work", type=Path, default=None, help="keep the workers' folders and logs here")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if not (common.SMOLLM2 / "config.json").is_file():
        sys.exit(f"{common.SMOLLM2} is missing (scripts/get_smollm2.py)")
    work = args.work or Path(tempfile.mkdtemp(prefix="mftcoder-dpo-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = common.write_task(work / "data" / "pairs", common.make_pairs(args.pairs))
    script = Path(__file__).resolve()
    rounds = []
    for k in range(1, args.rounds + 1):
        runs = {}
        for variant in args.variants:
            full = variant != "lora"
            spec = {"variant": variant, "data": data, "beta": 0.1, "lr": args.lr if full else 1e-4, "full": full,
                    "max_length": 256, "steps": args.steps}
            runs[variant] = common.run_worker(sys.executable, script, spec, work / f"round{k}-{variant}",
                                              f"round {k} {variant}", args.timeout, pythonpath=str(common.REPO),
                                              threads=args.threads)
        rounds.append(runs)
        (work / "raw.json").write_text(json.dumps(rounds, indent=1))  # kept if the report fails
    threads = rounds[0][args.variants[0]]["versions"]["threads"]
    header = [f"### DPO reference model on SmolLM2-135M-Instruct: {args.pairs} pairs, batches of 8, {args.steps} timed "
              "steps", "", f"- Machine: {common.machine_line()}, torch threads per worker {threads}; shared with other "
              f"people's tests while this ran (see *other load*); {common.code_line()}", "", ""]
    text = "\n".join(header) + report(rounds, args, (time.perf_counter() - started) / 60)
    common.publish_report(text, work, args.report, keep_work=args.work is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
