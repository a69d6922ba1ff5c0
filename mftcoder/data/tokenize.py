"""One-pass tokenization with exact loss masks, cached on disk as memory-mapped arrays per task."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from mftcoder.data.records import BadRecord, DataError, Turn, parse_record, read_lines
from mftcoder.data.tasks import Task
from mftcoder.data.template import ChatTemplate

CACHE_FORMAT = 1
CHUNK_LINES = 2000
PARALLEL_MIN_BYTES = 4 * 1024 * 1024  # below this, starting worker processes costs more than it saves


def supervised_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose character range overlaps a supervised span (bot content + EOS)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for span_start, span_end in spans:
        mask |= (starts < span_end) & (ends > span_start)
    return mask


def encode_conversations(tokenizer, template: ChatTemplate, conversations: list[tuple[Turn, ...]],
                         add_generation_prompt: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render and tokenize whole conversations in one pass each; return (ids, loss mask) per conversation."""
    if not conversations:
        return []
    rendered = [template.render(turns, tokenizer.eos_token, add_generation_prompt) for turns in conversations]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=True, return_attention_mask=False)
    out = []
    for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered):
        out.append((np.asarray(ids, dtype=np.int32), supervised_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), spans)))
    return out


@dataclass
class EncodedChunk:
    """Tokenized records of one chunk of lines, concatenated, plus the chunk's bad records."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    lines: np.ndarray
    errors: list[str]
    path: str
    num_bytes: int  # roughly, for progress


@dataclass
class ChunkEncoder:
    """Parse, validate and tokenize a chunk of lines; picklable so worker processes can run it."""

    tokenizer: object
    template: ChatTemplate

    def __call__(self, job: tuple[str, list[tuple[int, str | BadRecord]]]) -> EncodedChunk:
        path, lines = job
        conversations, numbers, errors = [], [], []
        num_bytes = sum(len(text) + 1 for _, text in lines if isinstance(text, str))
        for number, text in lines:
            try:
                if isinstance(text, BadRecord):
                    raise text
                conversations.append(parse_record(text))
                numbers.append(number)
            except BadRecord as exc:
                errors.append(f"{path}:{number}: {exc}")
        encoded = encode_conversations(self.tokenizer, self.template, conversations)
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        ids = np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, np.int32)
        mask = np.concatenate([m for _, m in encoded]) if encoded else np.zeros(0, np.uint8)
        return EncodedChunk(ids, mask, lengths, np.array(numbers, dtype=np.int32), errors, path, num_bytes)


@dataclass
class TokenizedTask:
    """A task's tokenized records: one flat token array and one flat mask (memory-mapped), an offset per record."""

    task: Task
    ids: np.ndarray
    mask: np.ndarray
    starts: np.ndarray  # record i is ids[starts[i]:starts[i+1]]
    file_index: np.ndarray  # which of task.files each record came from
    lines: np.ndarray  # its line number there
    errors: list[str]  # bad records as 'file:line: reason'
    num_lines: int
    from_cache: bool

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def sample(self, i: int, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.starts[i]), int(self.starts[i + 1])
        if max_length is not None:
            end = min(end, start + max_length)
        return np.asarray(self.ids[start:end]), np.asarray(self.mask[start:end])

    def where(self, i: int) -> str:
        return f"{self.task.files[self.file_index[i]]}:{self.lines[i]}"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("a fast (Rust-backed) tokenizer is needed for exact character offsets; this one is slow")
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token]).encode())
    return digest.hexdigest()


def cache_key(task: Task, tokenizer, template: ChatTemplate) -> str:
    """Changes when a file (path, size, mtime), the tokenizer, the template or the cache format changes."""
    digest = hashlib.sha256()
    files = [(str(p.relative_to(task.path)), p.stat().st_size, p.stat().st_mtime_ns) for p in task.files]
    settings = {"format": CACHE_FORMAT, "template": dataclasses.asdict(template), "files": files,
                "tokenizer": tokenizer_fingerprint(tokenizer), "root": str(task.path.resolve())}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def default_cache_root() -> Path:
    if os.environ.get("MFTCODER_CACHE"):
        return Path(os.environ["MFTCODER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mftcoder"


def _chunks(task: Task) -> Iterator[tuple[str, list[tuple[int, str | BadRecord]]]]:
    for path in task.files:
        lines = read_lines(path)
        while chunk := list(itertools.islice(lines, CHUNK_LINES)):
            yield str(path), chunk


def _single_threaded_worker() -> None:
    """In a tokenization worker process: one tokenizer thread each (the processes are the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_encoder(task: Task, encoder: ChunkEncoder, workers: int) -> Iterator[EncodedChunk]:
    """Encode the task chunk by chunk, in order; in worker processes when the data is large enough."""
    total_bytes = sum(p.stat().st_size for p in task.files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {task.name}", leave=False,
              disable=None) as progress:
        if workers > 1 and total_bytes >= PARALLEL_MIN_BYTES:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with context.Pool(workers, initializer=_single_threaded_worker) as pool:
                for chunk in pool.imap(encoder, _chunks(task)):
                    progress.update(chunk.num_bytes)
                    yield chunk
        else:
            for job in _chunks(task):
                chunk = encoder(job)
                progress.update(chunk.num_bytes)
                yield chunk


def build_cache(task: Task, tokenizer, template: ChatTemplate, directory: Path, workers: int) -> None:
    """Tokenize a task into `directory`, written under a temporary name and renamed when complete."""
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    starts, file_index, lines, errors = [0], [], [], []
    num_lines = 0
    file_ids = {str(p): i for i, p in enumerate(task.files)}
    with open(tmp / "ids.bin", "wb") as ids_out, open(tmp / "mask.bin", "wb") as mask_out:
        for chunk in _run_encoder(task, ChunkEncoder(tokenizer, template), workers):
            ids_out.write(chunk.ids.tobytes())
            mask_out.write(chunk.mask.tobytes())
            starts.extend((starts[-1] + np.cumsum(chunk.lengths)).tolist())
            file_index.extend([file_ids[chunk.path]] * len(chunk.lengths))
            lines.extend(chunk.lines.tolist())
            errors.extend(chunk.errors)
            num_lines += len(chunk.lengths) + len(chunk.errors)
    np.savez(tmp / "index.npz", starts=np.array(starts, dtype=np.int64), file_index=np.array(file_index, dtype=np.int32),
             lines=np.array(lines, dtype=np.int32))
    meta = {"format": CACHE_FORMAT, "task": task.name, "files": [str(p) for p in task.files],
            "errors": errors, "num_lines": num_lines, "num_tokens": starts[-1]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, directory)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def _memmap(path: Path, dtype: type) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_tokenized(task: Task, tokenizer, template: ChatTemplate, cache_root: Path | None = None,
                   workers: int | None = None, overwrite: bool = False) -> TokenizedTask:
    """The task's tokenized records, from the cache when it matches, else tokenized now and cached."""
    root = Path(cache_root) if cache_root else default_cache_root()
    directory = root / f"{task.name}-{cache_key(task, tokenizer, template)}"
    from_cache = (directory / "meta.json").exists() and not overwrite
    if not from_cache:
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        build_cache(task, tokenizer, template, directory, workers or os.cpu_count() or 1)
    meta = json.loads((directory / "meta.json").read_text())
    index = np.load(directory / "index.npz")
    return TokenizedTask(task, _memmap(directory / "ids.bin", np.int32), _memmap(directory / "mask.bin", np.uint8),
                         index["starts"], index["file_index"], index["lines"], meta["errors"], meta["num_lines"],
                         from_cache)
