#!/usr/bin/env python
"""mftcoder's DPO side by side with TRL's DPOTrainer: the same pairs, model, template and settings.

    python bench/dpo_vs_trl.py                      # LoRA (primary), check + 2 interleaved timing rounds
    python bench/dpo_vs_trl.py --full               # full fine-tuning (both with precomputed reference log-probs)
    python bench/dpo_vs_trl.py --trl-python /work/main/.venv-trl/bin/python --steps 10 --rounds 2

Model SmolLM2-135M-Instruct in float32, its own chat template (`chat_template: model`), pairs from the demo
code_generation task (prompt + answer <= 256 tokens), beta 0.1, sigmoid loss, AdamW (weight decay 0, betas
0.9/0.999, eps 1e-8), constant learning rate, no warmup, gradient clipping at 1.0, batches of 8 pairs. LoRA: r 8,
alpha 16, dropout 0, all seven Llama projections; TRL's adapter starts from mftcoder's initial adapter weights (A
random, B zero), so that the one update is comparable. TRL runs in its own virtual environment (`--trl-python`), each
worker in a fresh process started by this one.

1. Check: both frameworks evaluate 8 pairs (the whole data of that run), take exactly one optimizer step on those 8
   pairs as one batch, and evaluate them again: loss and rewards/chosen, rejected, margins, accuracies, before and
   after, per pair and as means; the token ids and which tokens each framework sums over are compared too.
2. Speed and memory: 32 pairs, `--steps` timed optimizer steps after a first (warm-up) step, then one more step under
   mftcoder's TensorBytes meter (peak bytes of live tensors). Rounds run interleaved (mftcoder, mftcoder with
   `max_forward_tokens: 0`, TRL, then again) so that other load on the machine hits all alike; each round's ratios
   are reported. The second mftcoder variant runs each batch in one forward pass, as TRL does (mftcoder's CPU default
   splits a batch into passes of at most 1024 tokens), which separates that choice from the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_common as common  # noqa: E402

DEFAULT_TRL_PYTHON = str(common.REPO / ".venv-trl" / "bin" / "python")
ONE_PASS = "mftcoder, max_forward_tokens 0"
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


# ============================================================================================ mftcoder worker
def mftcoder_config(spec: dict, max_steps: int):
    from mftcoder.config import build_config

    values = {
        "data_paths": [spec["data"]], "data_cache_dir": str(Path(spec["work"]) / "cache"),
        "output_dir": str(Path(spec["work"]) / "out"), "pretrained_model_path": str(common.SMOLLM2),
        "chat_template": "model", "objective": "dpo", "beta": spec["beta"], "dpo_loss": "sigmoid",
        "seq_length": spec["max_length"], "padding_mode": "dynamic", "data_split": "100,0,0",
        "weighted_loss_mode": "case1", "per_device_train_batch_size": 8, "per_device_valid_batch_size": 8,
        "learning_rate": spec["lr"], "lr_scheduler_type": "constant", "num_warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "max_steps": max_steps, "num_train_epochs": 100, "evaluation_strategy": "no",
        "evaluate_before_training": False, "checkpointing_steps": 10**9, "log_interval": 1, "seed": common.SEED,
        "plot_curves": False, "torch_dtype": "float32", **spec.get("mftcoder_extra", {}),
    }
    if not spec["full"]:
        values.update(peft_type="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=common.LLAMA_LIKE)
    return build_config(values)[0]


def mftcoder_pairs(trainer, rows) -> dict:
    """Per pair (rows' order): loss, rewards and log-probs from mftcoder's own objective, in evaluation mode."""
    import torch

    batch = trainer.reader[rows].to(trainer.env.device)
    trainer.runner.eval()
    with torch.no_grad(), trainer.autocast:
        _, stats = trainer.objective.forward(trainer.runner, batch, None)
    trainer.runner.train()
    out = {"loss": stats.loss_sum.tolist()}
    out.update({name: stats.extras[name].tolist() for name in METRICS[1:]})
    return out


def worker_mftcoder(spec: dict) -> dict:
    import numpy as np
    from mftcoder.train.distributed import DistEnv
    from mftcoder.train.loop import Trainer
    from mftcoder.train.memory_meter import TensorBytes

    check, profile = spec["mode"] == "check", spec["mode"] == "profile"
    steps = 1 if check else 2 if profile else spec["steps"] + 2
    started = time.perf_counter()
    trainer = Trainer(mftcoder_config(spec, steps), DistEnv())
    setup_s = time.perf_counter() - started
    result = {"setup_s": setup_s}
    if check:
        if not spec["full"]:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
            save_file(state, spec["adapter"])
        task = trainer.data.per_task[0]
        records = list(range(len(task.data)))
        rows = [np.array([[0, r]]) for r in records]
        result["sequences"] = [[seq[0].tolist() for seq in task.sequences(r)] for r in records]
        result["masks"] = [[seq[1].tolist() for seq in task.sequences(r)] for r in records]
        result["before"] = mftcoder_pairs(trainer, rows)
    clock = common.StepClock(None if check or profile else steps, TensorBytes, 2 if profile else None)
    run, started = common.timed_run(trainer, clock)
    result.update(clock.summary(started))
    result["step_losses"] = run.step_losses
    train_rows = [json.loads(line) for line in (Path(spec["work"]) / "out" / "metrics.jsonl").read_text().splitlines()]
    result["train_logged"] = [row for row in train_rows if row.get("split", "train") == "train" and "loss" in row]
    result["tokens_seen"] = run.tokens_seen
    if check:
        result["after"] = mftcoder_pairs(trainer, rows)
    return result


# ================================================================================================= TRL worker
def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    check, profile = spec["mode"] == "check", spec["mode"] == "profile"
    steps = 1 if check else 2 if profile else spec["steps"] + 2
    pairs = [json.loads(line) for line in (Path(spec["data"]) / "data.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([common.conversational(p) for p in pairs])
    tokenizer = AutoTokenizer.from_pretrained(common.SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(common.SMOLLM2, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=str(Path(spec["work"]) / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", max_steps=steps, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=common.SEED,
        data_seed=common.SEED, beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
        precompute_ref_log_probs=spec["full"], dataloader_num_workers=0, disable_tqdm=True)
    peft_config = None
    if not spec["full"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=common.LLAMA_LIKE,
                                 task_type="CAUSAL_LM")
    meter_class = common.tensor_bytes_meter()
    clock = common.StepClock(None if check or profile else steps, meter_class, 2 if profile else None)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            clock.end(state.global_step)  # global_step already counts this step here

    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset if check else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    result = {"setup_s": time.perf_counter() - started}
    if check:
        if not spec["full"]:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict
            from safetensors.torch import load_file

            initial = load_file(spec["adapter"])
            ours = get_peft_model_state_dict(trainer.model)
            if sorted(initial) != sorted(ours) or any(initial[k].shape != ours[k].shape for k in ours):
                raise SystemExit("mftcoder's initial adapter does not fit TRL's model")
            set_peft_model_state_dict(trainer.model, initial)
        prepared = trainer.train_dataset
        result["sequences"] = [[p + c, p + r] for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"],
                                                                   prepared["rejected_ids"])]
        result["completion_lengths"] = [[len(c), len(r)] for c, r in zip(prepared["chosen_ids"],
                                                                          prepared["rejected_ids"])]
        result["before"] = trl_pairs(trainer)
    started = time.perf_counter()
    trainer.train()
    result.update(clock.summary(started))
    result["train_logged"] = [row for row in trainer.state.log_history if "loss" in row]
    if check:
        result["after"] = trl_pairs(trainer)
    return result


def trl_pairs(trainer) -> dict:
    """Per pair (dataset order) from TRL's own evaluation: its rewards are recorded as they pass through
    accelerator.gather (the per-pair tensors TRL averages for its logs); the loss follows from the margin."""
    import torch.nn.functional as F

    seen, gather, compute_loss, inside = [], trainer.accelerator.gather, trainer._compute_loss, [False]

    def recording(tensor):
        if inside[0]:
            seen.append(tensor.detach().double().cpu().clone())
        return gather(tensor)

    def loss_recorded(*args, **kwargs):
        inside[0] = True
        try:
            return compute_loss(*args, **kwargs)
        finally:
            inside[0] = False

    trainer.accelerator.gather, trainer._compute_loss = recording, loss_recorded
    try:
        metrics = trainer.evaluate()
    finally:
        trainer.accelerator.gather, trainer._compute_loss = gather, compute_loss
    if len(seen) < 6 or any(t.shape != seen[-1].shape for t in seen[-6:]):
        raise SystemExit(f"TRL gathered {[tuple(t.shape) for t in seen]} in one evaluation batch; expected its "
                         "per-pair rewards, accuracies, margins and log-probs last")
    chosen, rejected, accuracies, margins, logps_c, logps_r = seen[-6:]  # the order of TRL 1.16's _compute_loss
    for name, values in (("rewards/chosen", chosen), ("rewards/rejected", rejected), ("rewards/accuracies", accuracies),
                         ("rewards/margins", margins), ("logps/chosen", logps_c), ("logps/rejected", logps_r)):
        if not math.isclose(float(values.mean()), metrics[f"eval_{name}"], rel_tol=1e-5, abs_tol=1e-6):
            raise SystemExit(f"recorded {name} does not match TRL's logged eval_{name}")
    out = {"loss": (-F.logsigmoid(margins)).tolist(), "rewards/chosen": chosen.tolist(),
           "rewards/rejected": rejected.tolist(), "rewards/margins": margins.tolist(),
           "rewards/accuracies": accuracies.tolist(), "logps/chosen": logps_c.tolist(),
           "logps/rejected": logps_r.tolist(), "logged_loss": metrics["eval_loss"]}
    return out


# ====================================================================================================== driver
def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check_section(mft: dict, trl: dict, tokenizer_dir: Path) -> list[str]:
    """Tokens, then the step-0 and after-one-update metrics side by side (means over the 8 pairs, and the largest
    per-pair difference)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = []
    same_ids = mft["sequences"] == trl["sequences"]
    extra = []  # TRL's completion tokens that mftcoder does not sum
    for seqs, masks, lengths in zip(mft["sequences"], mft["masks"], trl["completion_lengths"]):
        for ids, mask, n in zip(seqs, masks, lengths):
            ours = [i for i, (token, m) in enumerate(zip(ids, mask)) if m]
            theirs = list(range(len(ids) - n, len(ids)))
            extra.append(tuple(tokenizer.decode([ids[i]]) for i in theirs if i not in ours)
                         + tuple(f"-{tokenizer.decode([ids[i]])}" for i in ours if i not in theirs))
    kinds = sorted(set(extra))
    lines.append(f"- Token ids of all {2 * len(mft['sequences'])} sequences identical (prompt + answer through the "
                 f"model's chat template): **{same_ids}**.")
    lines.append("- Tokens TRL sums over that mftcoder does not (per sequence): "
                 + ", ".join(f"{k!r} x {extra.count(k)}" for k in kinds) + ".")
    rows = ["| when | metric | mftcoder | TRL | TRL − mftcoder | max per-pair abs diff |",
            "|---|---|---:|---:|---:|---:|"]
    for when, label in (("before", "step 0 (before the update), eval"), ("after", "after one update, eval")):
        for name in METRICS:
            a, b = mft[when][name], trl[when][name]
            rows.append(f"| {label} | {name} | {mean(a):.6f} | {mean(b):.6f} | {mean(b) - mean(a):+.2e} | "
                        f"{max(abs(x - y) for x, y in zip(a, b)):.2e} |")
    first_mft, first_trl = mft["train_logged"][0], trl["train_logged"][0]
    for name in METRICS[:5]:
        key = name
        if key in first_mft and key in first_trl:
            rows.append(f"| step 1, training pass (logged) | {name} | {first_mft[key]:.6f} | {first_trl[key]:.6f} | "
                        f"{first_trl[key] - first_mft[key]:+.2e} | |")
    rows.append(f"| step 1 | objective returned by the step | {mft['step_losses'][0]:.6f} | | | |")
    lines += ["", *rows]
    return lines


def timing_section(rounds: list[dict[str, dict]]) -> list[str]:
    """Each round: {variant: result}, TRL last; ratios of every mftcoder variant to TRL of the same round."""
    rows = ["| round | variant | first step s | median step s | mean step s | steps timed | peak live tensors GiB "
            "| of which at step start | peak RSS GiB | set-up s | other load (cores) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios: dict[str, list[tuple]] = {}
    for k, runs in enumerate(rounds, 1):
        trl = runs["TRL"]
        for name, r in runs.items():
            rows.append(f"| {k} | {name} | {r['first_step_s']:.2f} | {common.median(r['step_s']):.2f} | "
                        f"{mean(r['step_s']):.2f} | {len(r['step_s'])} | {common.gib(r['meter_peak'])} | "
                        f"{common.gib(r['meter_start'])} | {common.gib(r['peak_rss'])} | {r['setup_s']:.1f} | "
                        f"{r['others']:.2f} |")
            if name != "TRL":
                ratios.setdefault(name, []).append((
                    common.median(r["step_s"]) / common.median(trl["step_s"]), r["meter_peak"] / trl["meter_peak"],
                    (r["meter_peak"] - r["meter_start"]) / (trl["meter_peak"] - trl["meter_start"]),
                    r["peak_rss"] / trl["peak_rss"]))
    rows += ["", "| variant / TRL | round | time per step (medians) | peak live tensors | growth within the step "
             "(peak − start) | peak RSS |", "|---|---|---:|---:|---:|---:|"]
    for name, values in ratios.items():
        for k, r in enumerate(values, 1):
            rows.append(f"| {name} | {k} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")
        if len(values) > 1:
            rows.append(f"| {name} | median | " + " | ".join(f"{common.median([r[i] for r in values]):.2f}"
                                                           for i in range(4)) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = common.worker_spec(argv)
    if spec is not None:
        result = (worker_mftcoder if spec["kind"] == "mftcoder" else worker_trl)(spec)
        common.finish_worker(spec, result)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (the primary)")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 (LoRA), 1e-6 (full)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps (after one warm-up step and before the metered one; 6: two epochs in all)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (mftcoder, TRL) x N")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every worker (default: torch's, one per core); on a machine shared "
                             "with other work, 1 avoids threads waiting on each other")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="only profile each framework's second step (torch.profiler, operators by self CPU time)")
    parser.add_argument("--no-one-pass", action="store_true",
                        help="leave out the mftcoder variant that runs each batch in one forward pass")
    parser.add_argument("--work", type=Path, default=None, help="keep the workers' folders and logs here")
    parser.add_argument("--report", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    args.skip_check = args.skip_check or args.profile
    if not (common.SMOLLM2 / "config.json").is_file():
        sys.exit(f"{common.SMOLLM2} is missing (scripts/get_smollm2.py)")
    if not Path(args.trl_python).is_file():
        sys.exit(f"{args.trl_python} is missing: python3 -m venv .venv-trl && .venv-trl/bin/pip install "
                 "torch==2.13.0 trl==1.16.0 peft transformers==5.24.0")
    lr = args.lr or (1e-6 if args.full else 1e-4)
    work = args.work or Path(tempfile.mkdtemp(prefix="mftcoder-dpo-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pairs = common.make_pairs(args.pairs)
    data_all = common.write_task(work / "data" / "all" / "pairs", pairs)
    data_check = common.write_task(work / "data" / "check" / "pairs", pairs[:8])
    base = {"beta": args.beta, "lr": lr, "full": args.full, "max_length": 256, "steps": args.steps,
            "adapter": str(work / "initial_adapter.safetensors")}
    script = Path(__file__).resolve()
    mft_python, repo = sys.executable, str(common.REPO)

    def mft(mode: str, data: str, name: str, extra: dict | None = None) -> dict:
        spec = {**base, "kind": "mftcoder", "mode": mode, "data": data, "mftcoder_extra": extra or {}}
        return common.run_worker(mft_python, script, spec,
                                 work / name, name, args.timeout, pythonpath=repo, threads=args.threads)

    def trl(mode: str, data: str, name: str) -> dict:
        return common.run_worker(args.trl_python, script, {**base, "kind": "trl", "mode": mode, "data": data},
                                 work / name, name, args.timeout, threads=args.threads)

    lines = [f"### {'Full fine-tuning' if args.full else 'LoRA r=8 (primary)'}: mftcoder vs TRL DPOTrainer", "",
             f"- Machine: {common.machine_line()}; shared with other people's tests while this ran (see the *other "
             f"load* column); {common.code_line()}",
             f"- Settings: SmolLM2-135M-Instruct float32, its own chat template, beta {args.beta}, sigmoid, lr {lr} "
             f"constant, no warmup, AdamW, batch 8 pairs, "
             + ("full fine-tuning, reference log-probs precomputed before training on both sides" if args.full else
                "LoRA r 8 / alpha 16 / dropout 0 on q,k,v,o,gate,up,down; reference = adapter disabled on both sides")]
    checked = None
    if not args.skip_check:
        print("check: one update on 8 pairs")
        checked = (mft("check", data_check, "check-mftcoder"), trl("check", data_check, "check-trl"))
        versions = checked[1]["versions"]
        lines.append(f"- torch threads per worker: {versions.get('threads')}")
        lines.append(f"- TRL side: trl {versions.get('trl')}, transformers {versions.get('transformers')}, peft "
                     f"{versions.get('peft')}, torch {versions.get('torch')}; mftcoder side: transformers "
                     f"{checked[0]['versions'].get('transformers')}, peft {checked[0]['versions'].get('peft')}")
        lines += ["", "#### One update on the same 8 pairs", "", *check_section(*checked, common.SMOLLM2)]
    if args.profile:
        for name, run in (("mftcoder", mft), ("TRL", trl)):
            profiled = run("profile", data_all, f"profile-{name.lower()}")
            lines += ["", f"#### Profile of one step: {name} (step time {profiled['step_s'][0]:.1f} s under the "
                      "profiler)", "", "```", profiled["profile"], "```"]
        args.rounds = 0
    rounds = []
    if args.rounds:
        print(f"timing: {args.rounds} interleaved rounds, {args.pairs} pairs, 1 + {args.steps} + 1 (metered) steps")
        for k in range(1, args.rounds + 1):
            runs = {"mftcoder": mft("time", data_all, f"time{k}-mftcoder")}
            if not args.no_one_pass:
                runs[ONE_PASS] = mft("time", data_all, f"time{k}-mftcoder-one-pass", {"max_forward_tokens": 0})
            runs["TRL"] = trl("time", data_all, f"time{k}-trl")
            rounds.append(runs)
        lines += ["", f"#### Speed and memory: {args.pairs} pairs, {args.steps} timed steps of 8 pairs, interleaved",
                  "",
                  *timing_section(rounds)]
    minutes = (time.perf_counter() - started) / 60
    lines += ["", f"- Benchmark wall time: {minutes:.1f} minutes"]
    text = "\n".join(lines)
    (work / "raw.json").write_text(json.dumps({"check": checked, "rounds": rounds}, indent=1))
    common.publish_report(text, work, args.report, keep_work=args.work is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
