"""Tokenization with worker processes: mftcoder's ordered map (data/workers.py, one job in flight per worker, no
threads) against multiprocessing.Pool.imap (what it replaced), side by side in one process, alternating, on the same
task. Both produce the same chunks; the table gives seconds and the ratio.

    python bench/tokenize_workers.py [--mb 16] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from mftcoder.config import build_config
from mftcoder.data import tokenize
from mftcoder.data.tasks import Task
from mftcoder.data.workers import ordered_map
from mftcoder.model import DEMO_DATA, load_tokenizer


def pool_imap(encoder, jobs, workers: int, setup):
    """The replaced way: Pool.imap (a feeder thread, jobs queued ahead without bound)."""
    with multiprocessing.get_context("fork").Pool(workers, initializer=setup) as pool:
        yield from pool.imap(encoder, jobs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer, template = load_tokenizer(build_config({})[0])
    lines = (DEMO_DATA / "code_generation" / "train.jsonl").read_bytes()
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "big"
        folder.mkdir()
        (folder / "data.jsonl").write_bytes(lines * (args.mb * 2**20 // len(lines)))
        task = Task(0, "big", folder, (folder / "data.jsonl",))
        encoder = tokenize.ChunkEncoder(tokenizer, template)
        ways = {"ordered_map": ordered_map, "Pool.imap": pool_imap}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, way in ways.items():
                started = time.perf_counter()
                chunks = way(encoder, tokenize._chunks(task), args.workers, tokenize._single_threaded_worker)
                tokens[name] = sum(int(c.lengths.sum()) for c in chunks)
                seconds[name].append(time.perf_counter() - started)
    assert tokens["ordered_map"] == tokens["Pool.imap"], tokens
    base = statistics.median(seconds["Pool.imap"])
    print(f"{args.mb} MB of JSONL, {tokens['ordered_map']:,} tokens, {args.workers} workers, median of {args.repeats}")
    print("| way | seconds (median) | all runs | vs Pool.imap |\n|---|---:|---|---:|")
    for name, runs in seconds.items():
        print(f"| {name} | {statistics.median(runs):.2f} | {', '.join(f'{s:.2f}' for s in runs)} | "
              f"{statistics.median(runs) / base:.2f} |")


if __name__ == "__main__":
    main()
