"""Shared parts of the preference benchmarks (bench/dpo_vs_trl.py, bench/dpo_reference.py): the pairs, running a
worker in a fresh process (and how busy the rest of the machine was meanwhile), and the memory measures.

Only the standard library is imported at module level: a worker may run in another virtual environment (TRL's),
which has torch but not mftcoder's own dependencies.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from throughput import code_line  # noqa: F401  (re-exported: which mftcoder was measured, said in one place)

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# MFTCODER_SMOLLM2: the model folder of another checkout (models/ is not committed)
SMOLLM2 = Path(os.environ.get("MFTCODER_SMOLLM2", REPO / "models" / "SmolLM2-135M-Instruct"))
DEMO = REPO / "mftcoder" / "assets" / "demo_data" / "code_generation" / "train.jsonl"
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 42


# ----------------------------------------------------------------------------------------------------------- pairs
def make_pairs(count: int, max_tokens: int = 256) -> list[dict]:
    """`count` preference pairs from mftcoder's demo code_generation task (mftcoder's record form): the shortest
    records (by SmolLM2's chat template) whose prompt + answer fit `max_tokens`; each pair's chosen answer is the
    record's own implementation, its rejected answer the next record's (another function). An optional system turn
    is kept ("system"); records without one get the template's default system prompt on both sides."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    records = [json.loads(line) for line in DEMO.read_text().splitlines()]

    def length(record: dict, answer: str) -> int:
        messages = [{"role": {"human": "user", "bot": "assistant"}.get(t["role"], t["role"]), "content": t["content"]}
                    for t in record["chat_rounds"][:-1]] + [{"role": "assistant", "content": answer}]
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    ranked = sorted(records, key=lambda r: length(r, r["chat_rounds"][-1]["content"]))[:count + 8]
    pairs = []
    for record, other in zip(ranked, ranked[1:] + ranked[:1]):
        *prompt, answer = record["chat_rounds"]
        rejected = other["chat_rounds"][-1]["content"]
        longest = max(length(record, answer["content"]), length(record, rejected))
        if answer["content"] == rejected or longest > max_tokens:
            continue
        pair = {"prompt": prompt[-1]["content"], "chosen": answer["content"], "rejected": rejected}
        if prompt[0]["role"] == "system":
            pair["system"] = prompt[0]["content"]
        pairs.append(pair)
        if len(pairs) == count:
            return pairs
    raise SystemExit(f"only {len(pairs)} pairs of at most {max_tokens} tokens in {DEMO}")


def conversational(pair: dict) -> dict:
    """The same pair in TRL's conversational preference form (explicit prompt)."""
    prompt = ([{"role": "system", "content": pair["system"]}] if "system" in pair else []) + [
        {"role": "user", "content": pair["prompt"]}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def write_task(folder: Path, pairs: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(folder)


# ------------------------------------------------------------------------------------------------------- processes
def cpu_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (all cores), from /proc/stat."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(python: str, script: Path, spec: dict, work: Path, name: str, timeout: float,
               pythonpath: str | None = None, threads: int | None = None) -> dict:
    """Run `script --worker spec.json` with `python` in a fresh process; its result (the JSON it wrote), plus the wall
    time and the cores other processes used meanwhile (the machine's busy time less this worker's own CPU time)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "work": str(work), "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TQDM_DISABLE="1", HF_DATASETS_CACHE=str(work / "hf-datasets"), TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if threads:  # torch's intra-op threads (read at start-up); the same for every worker
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"  {name} ...", end="", flush=True)
    started, busy, own = time.perf_counter(), cpu_busy_seconds(), children_cpu_seconds()
    try:
        with open(work / "log.txt", "w") as log:
            code = subprocess.run([python, str(script), "--worker", str(work / "spec.json")], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=str(REPO)).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    wall = time.perf_counter() - started
    others = None
    if busy is not None and (after := cpu_busy_seconds()) is not None:
        others = max(0.0, (after - busy) - (children_cpu_seconds() - own)) / max(wall, 1e-9)
    result_path = work / "result.json"
    if code != 0 or not result_path.is_file():
        tail = (work / "log.txt").read_text(errors="replace").strip().splitlines()[-20:]
        print(f" FAILED ({code}, {wall:.0f} s); log {work / 'log.txt'}:\n    " + "\n    ".join(tail), flush=True)
        raise SystemExit(f"worker {name} failed")
    result = json.loads(result_path.read_text())
    result.update(wall=wall, others=others)
    print(f" {wall:.0f} s" + (f", other processes {others:.2f} cores" if others is not None else ""), flush=True)
    return result


def worker_spec(argv: list[str]) -> dict | None:
    """The spec when this process is a worker (`--worker spec.json`), else None."""
    if len(argv) == 2 and argv[0] == "--worker":
        return json.loads(Path(argv[1]).read_text())
    return None


def finish_worker(spec: dict, result: dict) -> None:
    import torch

    versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for package in ("transformers", "peft", "trl"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    result.update(peak_rss=peak_rss_bytes(), versions=versions)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started (VmHWM), model loading included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes_meter():
    """mftcoder's TensorBytes (mftcoder/train/memory_meter.py), loaded from its file so that a worker without
    mftcoder's dependencies (TRL's environment) measures with the same code."""
    path = REPO / "mftcoder" / "train" / "memory_meter.py"
    spec = importlib.util.spec_from_file_location("_bench_memory_meter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TensorBytes


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor Python can reach now (parameters, their gradients,
    optimizer state, batches): the starting count for TensorBytes, which then adds what the step allocates."""
    import torch

    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if tensor.device.type != "cpu" or tensor.is_meta:
            return
        try:
            storage = tensor.untyped_storage()
        except RuntimeError:
            return
        if storage.data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()

    gc.collect()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                add(obj)
                if obj.grad is not None:
                    add(obj.grad)
        except Exception:  # an object that fails isinstance/attribute access: not a tensor we can count
            continue
    return sum(storages.values())


class StepClock:
    """Wall-clock stamps at the end of each optimizer step; the last step can run under the TensorBytes meter."""

    def __init__(self, metered_step: int | None, meter_class=None, profiled_step: int | None = None):
        self.stamps: list[float] = []
        self.metered_step = metered_step  # 1-based step that runs under the meter (not timed)
        self.meter_class = meter_class
        self.meter = None
        self.meter_start = 0
        self.profiled_step = profiled_step  # 1-based step that runs under torch.profiler (its own run: not timed)
        self.profiler = None

    def begin(self, step: int) -> None:
        if step == self.profiled_step:
            import torch

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        if step == self.metered_step:
            import torch

            self.meter_start = live_tensor_bytes()
            self.meter = self.meter_class(torch.device("cpu"), self.meter_start)
            self.meter.__enter__()

    def end(self, step: int) -> None:
        if step == self.metered_step and self.meter is not None:
            self.meter.__exit__(None, None, None)
        if step == self.profiled_step and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        self.stamps.append(time.perf_counter())

    def profile_table(self, rows: int = 25) -> str:
        """The profiled step's operators by self CPU time (torch.profiler's own table)."""
        if self.profiler is None:
            return ""
        return self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)

    def summary(self, started: float) -> dict:
        """first: the first step (warm-up included); steps: the following steps' durations (not the metered one)."""
        stamps = self.stamps[:-1] if self.metered_step else self.stamps
        durations = [b - a for a, b in zip(stamps, stamps[1:])]
        out = {"first_step_s": stamps[0] - started if stamps else None, "step_s": durations}
        if self.meter is not None:
            out.update(meter_start=self.meter_start, meter_peak=self.meter.peak)
        if self.profiler is not None:
            out["profile"] = self.profile_table()
        return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def machine_line() -> str:
    import platform

    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}"


def default_python() -> str:
    return sys.executable


def timed_run(trainer, clock: "StepClock"):
    """trainer.run() with every optimizer step timed by `clock`; returns the run's result and the wall start."""
    inner, count = trainer.train_step, [0]

    def timed_step(batches):
        count[0] += 1
        clock.begin(count[0])
        loss = inner(batches)
        clock.end(count[0])
        return loss

    import torch

    trainer.train_step = timed_step
    torch.manual_seed(SEED)
    started = time.perf_counter()
    return trainer.run(), started


def publish_report(text: str, work: Path, report: Path | None, keep_work: bool) -> None:
    """Print the report, keep it in work/report.md (and --report), then remove the work folder unless it was asked for."""
    import shutil

    print("\n" + text)
    (work / "report.md").write_text(text + "\n")
    if report:
        report.write_text(text + "\n")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
