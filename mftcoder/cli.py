"""The `mftcoder` command: train, config show, data check."""

from __future__ import annotations

import argparse
import os
import sys

from mftcoder.config import Config, ConfigError, describe, load_config
from mftcoder.data.records import DataError


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; notes and summaries print once


def _load(args: argparse.Namespace) -> Config:
    config, notices = load_config(args.config, args.overrides)
    if _is_main_process():
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
    return config


def cmd_config_show(args: argparse.Namespace) -> int:
    print(describe(_load(args)), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from mftcoder.data.prepare import check_report, prepare_data
    from mftcoder.data.template import build_template
    from mftcoder.model import load_tokenizer

    config = _load(args)
    template = build_template(config.chat_template, config.chat_markers)
    tokenizer = load_tokenizer(config, template)
    prepared = prepare_data(config, tokenizer, template, raise_on_bad=False)
    for error in prepared.errors:
        print(error)
    print(check_report(prepared))
    cached = sum(t.data.from_cache for t in prepared.per_task)
    print(f"tokenized data: {cached} of {len(prepared.per_task)} task(s) read from the cache")
    if prepared.errors:
        policy = "stopping" if config.on_bad_record == "error" else "skipped and counted"
        print(f"{len(prepared.errors)} bad record(s) ({policy}: on_bad_record={config.on_bad_record})")
        return 1 if config.on_bad_record == "error" else 0
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mftcoder.train.loop import TrainingError, train

    config = _load(args)
    try:
        result = train(config)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if _is_main_process():
        print(f"final checkpoint: {result.final_checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mftcoder", description="Multi-task fine-tuning for code LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="YAML or JSON config file")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")
        return p

    with_config(commands.add_parser("train", help="multi-task fine-tuning, full or LoRA")).set_defaults(func=cmd_train)
    config = commands.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    with_config(config.add_parser("show", help="print the resolved config with help text")).set_defaults(
        func=cmd_config_show)
    data = commands.add_parser("data", help="inspect data").add_subparsers(dest="action", required=True)
    with_config(data.add_parser("check", help="validate data; per-task counts, lengths and splits")).set_defaults(
        func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
