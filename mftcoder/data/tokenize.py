"""One-pass tokenization with exact loss masks, cached on disk as memory-mapped arrays per task."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from mftcoder.config import task_name_problem
from mftcoder.data.cache_check import cache_problem, read_meta
from mftcoder.data.records import BadRecord, DataError, Turn, parse_json_object, read_lines, record_turns
from mftcoder.data.tasks import Task
from mftcoder.data.template import ChatTemplate, ModelTemplate, Rendering, control_token_pattern
from mftcoder.data.workers import ordered_map

CACHE_FORMAT = 2
CHUNK_LINES = 2000
PARALLEL_MIN_BYTES = 4 * 1024 * 1024  # below this, starting worker processes costs more than it saves
CUT_CHARS_PER_TOKEN = 8  # a record with more content characters than this x seq_length is tokenized cut first
CUT_MARGIN = 16  # a cut is kept only when it leaves this many tokens beyond seq_length


def supervised_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose character range overlaps a supervised span (bot content + EOS)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for span_start, span_end in spans:
        mask |= (starts < span_end) & (ends > span_start)
    return mask


Template = ChatTemplate | ModelTemplate


@dataclass
class Encoded:
    """One tokenized conversation: ids, loss mask, and how many control tokens in its contents became text."""

    ids: np.ndarray
    mask: np.ndarray
    as_text: int = 0


def _encode_piece(tokenizer, piece: str, as_text: bool, first: bool, newline: list[int]) -> tuple[list, list]:
    """Ids and offsets of one piece of a conversation (as_text: no special token is recognised in it). A later
    piece is encoded after a newline that is then removed, so SentencePiece adds no prefix space."""
    def encode(text: str) -> tuple[list, list]:
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
        return out["input_ids"], out["offset_mapping"]

    if not first:
        ids, offsets = encode("\n" + piece)
        if ids[:len(newline)] == newline:
            return ids[len(newline):], [(a - 1, b - 1) for a, b in offsets[len(newline):]]
    return encode(piece)


def _encode_sanitized(tokenizer, rendering: Rendering, literals: list[tuple[int, int]]) -> Encoded:
    """The conversation cut at the control tokens found in its contents; those are encoded as plain text and
    the pieces around them as usual: the rule of transformers' apply_chat_template(sanitize_control_tokens=True)."""
    text, newline = rendering.text, tokenizer("\n", add_special_tokens=False)["input_ids"]
    bounds = [0, *(x for span in literals for x in span), len(text)]
    ids, offsets = [], []
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if start == end:
            continue
        piece_ids, piece_offsets = _encode_piece(tokenizer, text[start:end], k % 2 == 1, k == 0, newline)
        if k % 2 == 1 and tokenizer.convert_tokens_to_ids(text[start:end]) in piece_ids:
            raise BadRecord(f"{text[start:end]!r} in a message cannot be kept as text: this tokenizer makes the "
                            "control token from its characters")
        ids += piece_ids
        offsets += [(a + start, b + start) for a, b in piece_offsets]
    return _encoded(ids, offsets, rendering, len(literals))


def _encoded(ids: list[int], offsets: list, rendering: Rendering, as_text: int = 0) -> Encoded:
    mask = supervised_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), rendering.supervised)
    return Encoded(np.asarray(ids, dtype=np.int32), mask, as_text)


def encode_renderings(tokenizer, controls: re.Pattern, renderings: list[Rendering]) -> list[Encoded | BadRecord]:
    """Tokenize rendered conversations (no BOS/EOS added: the rendering has them). Control tokens written by
    the template are control tokens; inside a message's content they are encoded as the characters they are.
    Conversations without such text go through the tokenizer in one batch; a refused one is a BadRecord."""
    literals = [[m.span() for start, end in r.contents for m in controls.finditer(r.text, start, end)]
                for r in renderings]
    out: list[Encoded | BadRecord] = [None] * len(renderings)  # type: ignore[list-item]
    plain = [i for i, found in enumerate(literals) if not found]
    if plain:
        encoded = tokenizer([renderings[i].text for i in plain], add_special_tokens=False,
                            return_offsets_mapping=True, return_attention_mask=False)
        for i, ids, offsets in zip(plain, encoded["input_ids"], encoded["offset_mapping"]):
            out[i] = _encoded(ids, offsets, renderings[i])
    for i, found in enumerate(literals):
        if found:
            try:
                out[i] = _encode_sanitized(tokenizer, renderings[i], found)
            except BadRecord as exc:
                out[i] = exc
    return out


def encode_conversations(tokenizer, template: Template, conversations: list[tuple[Turn, ...]],
                         add_generation_prompt: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render and tokenize whole conversations; (ids, loss mask) per conversation. A conversation the template
    or tokenizer refuses raises BadRecord."""
    renderings = [template.render(turns, add_generation_prompt) for turns in conversations]
    out = []
    for encoded in encode_renderings(tokenizer, control_token_pattern(tokenizer, template.jinja()), renderings):
        if isinstance(encoded, BadRecord):
            raise encoded
        out.append((encoded.ids, encoded.mask))
    return out


Job = tuple[str, list[tuple[int, str | BadRecord]]]  # a file's path and some of its (line number, text)


class Conversations:
    """What a record holds for SFT: one conversation, every bot turn supervised. An objective with other records
    (a preference pair: two conversations, only the last answer supervised; raw text for pretraining) overrides
    these: what a record's conversations are, or which files a task reads, how they become jobs and how a job is
    tokenized (`encoder`, a picklable callable with ChunkEncoder's contract)."""

    parts = 1  # sequences per record, kept together as one example
    last_answer_only = False
    suffixes: tuple[str, ...] = (".jsonl",)  # the task folder's data files end with one of these

    def conversations(self, record: dict) -> tuple[tuple[Turn, ...], ...]:
        return (record_turns(record),)

    def cache_tag(self) -> str:
        return "sft"

    def encoder(self, tokenizer, template: "Template", seq_length: int | None) -> Callable[[Job], "EncodedChunk"]:
        """What tokenizes a job (records far longer than seq_length may be cut first)."""
        return ChunkEncoder(tokenizer, template, seq_length, self)

    def jobs(self, task: Task) -> Iterator[Job]:
        """The task's files as jobs for the encoder: lines of JSONL, CHUNK_LINES at a time."""
        return _chunks(task)

    def cache_meta(self) -> dict:
        """Extra meta.json fields of a task's cache (what cache_problem checks beyond the defaults)."""
        return {}


@dataclass
class EncodedChunk:
    """Tokenized records of one chunk of lines, concatenated, plus the chunk's bad records."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray  # per sequence (an example of several sequences has them one after another)
    lines: np.ndarray  # per sequence
    errors: list[str]
    path: str
    num_bytes: int  # roughly, for progress
    as_text: int  # records whose contents held control tokens, encoded as text
    cut: int = 0  # records whose contents were cut before tokenizing (longer than seq_length can hold)


@dataclass
class ChunkEncoder:
    """Parse, validate, render and tokenize a chunk of lines; picklable so worker processes can run it."""

    tokenizer: object
    template: Template
    seq_length: int | None = None  # records far longer than this are cut before tokenizing (None: never)
    objective: "Conversations" = None  # what a record's conversations are (None: SFT's, one per record)

    def __post_init__(self):
        if self.objective is None:
            self.objective = Conversations()

    def __call__(self, job: tuple[str, list[tuple[int, str | BadRecord]]]) -> EncodedChunk:
        path, lines = job
        renderings, numbers, errors, long = [], [], {}, {}
        num_bytes = sum(len(text) + 1 for _, text in lines if isinstance(text, str))
        limit = None if self.seq_length is None or self.objective.parts > 1 else self.seq_length * CUT_CHARS_PER_TOKEN
        for number, text in lines:
            try:
                if isinstance(text, BadRecord):
                    raise text
                conversations = self.objective.conversations(parse_json_object(text))
                if limit is not None and sum(len(t.content) for t in conversations[0]) > limit:
                    long[number] = conversations[0]
                    continue
                rendered = [self._render(turns) for turns in conversations]
                renderings += rendered
                numbers += [number] * len(rendered)
            except BadRecord as exc:
                errors[number] = f"{path}:{number}: {exc}"
        controls = control_token_pattern(self.tokenizer, self.template.jinja())
        encoded_all: dict[int, list] = {}
        for number, encoded in zip(numbers, encode_renderings(self.tokenizer, controls, renderings)):
            encoded_all.setdefault(number, []).append(encoded)
        cut = 0
        for number, turns in long.items():
            encoded, was_cut = self._encode_long(turns, controls)
            encoded_all[number] = [encoded]
            cut += was_cut
        kept, kept_numbers, as_text = [], [], 0
        for number in sorted(encoded_all):
            sequences = encoded_all[number]
            bad = next((e for e in sequences if isinstance(e, BadRecord)), None)
            if bad is not None:
                errors[number] = f"{path}:{number}: {bad}"
            else:
                kept += sequences
                kept_numbers += [number] * len(sequences)
                as_text += any(e.as_text for e in sequences)
        lengths = np.array([len(e.ids) for e in kept], dtype=np.int64)
        ids = np.concatenate([e.ids for e in kept]) if kept else np.zeros(0, np.int32)
        mask = np.concatenate([e.mask for e in kept]) if kept else np.zeros(0, np.uint8)
        return EncodedChunk(ids, mask, lengths, np.array(kept_numbers, dtype=np.int32),
                            [errors[n] for n in sorted(errors)], path, num_bytes, as_text, cut)

    def _render(self, turns: tuple[Turn, ...]) -> Rendering:
        """A conversation rendered; where the objective learns only its answer, only the last bot turn is supervised."""
        rendering = self.template.render(turns)
        if self.objective.last_answer_only:
            rendering = dataclasses.replace(rendering, supervised=rendering.supervised[-1:])
        return rendering

    def _encode_long(self, turns: tuple[Turn, ...], controls: re.Pattern) -> tuple[Encoded | BadRecord, bool]:
        """A record with more text than seq_length tokens can hold, tokenized with its contents cut after the first
        N characters (N doubling from 8 x seq_length) once that leaves over seq_length + CUT_MARGIN tokens: what
        truncation keeps is then the same, at a fraction of the memory. Not cut where the cut-off text holds
        control-token text (which decides whether the record is refused or counted as text)."""
        total = sum(len(t.content) for t in turns)
        keep = self.seq_length * CUT_CHARS_PER_TOKEN
        while keep < total:
            cut_turns, left = [], keep
            for turn in turns:
                kept_text = turn.content[:max(left, 1)]
                if len(kept_text) < len(turn.content) and controls.pattern \
                        and controls.search(turn.content, max(0, len(kept_text) - 256)):
                    cut_turns = None
                    break
                cut_turns.append(Turn(turn.role, kept_text))
                left -= len(kept_text)
            if cut_turns is None:
                break
            (encoded,) = encode_renderings(self.tokenizer, controls, [self.template.render(cut_turns)])
            if isinstance(encoded, Encoded) and len(encoded.ids) > self.seq_length + CUT_MARGIN:
                return encoded, True
            keep *= 2
        (encoded,) = encode_renderings(self.tokenizer, controls, [self.template.render(turns)])
        return encoded, False


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
    as_text: int = 0  # records whose contents held control tokens, encoded as text
    digest: str = ""  # of the tokenized records: what resume compares
    cut: int = 0  # records cut before tokenizing (each over seq_length: truncated or dropped like the others)
    parts: int = 1  # sequences per record (a preference pair: 2), stored one after another
    chunk_length: int | None = None  # documents cut into records of at most this many tokens (pretraining)

    def __len__(self) -> int:
        return (len(self.starts) - 1) // self.parts

    @property
    def sequence_lengths(self) -> np.ndarray:
        """[records, parts]: the length of each record's sequences."""
        return np.diff(self.starts).reshape(-1, self.parts)

    @property
    def lengths(self) -> np.ndarray:
        return self.sequence_lengths.sum(1)

    def sequences(self, i: int, max_length: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, loss mask) of each of record i's sequences, each cut to max_length."""
        out = []
        for k in range(i * self.parts, (i + 1) * self.parts):
            start, end = int(self.starts[k]), int(self.starts[k + 1])
            if max_length is not None:
                end = min(end, start + max_length)
            out.append((np.asarray(self.ids[start:end]), np.asarray(self.mask[start:end])))
        return out

    def sample(self, i: int, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Record i's first (for SFT its only) sequence."""
        return self.sequences(i, max_length)[0]

    def where(self, i: int) -> str:
        return f"{self.task.files[self.file_index[i * self.parts]]}:{self.lines[i * self.parts]}"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("a fast (Rust-backed) tokenizer is needed for exact character offsets; this one is slow")
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token]).encode())
    return digest.hexdigest()


def cache_key(task: Task, tokenizer, template: Template, records: Conversations | None = None) -> str:
    """Changes when a file (path, size, mtime), the tokenizer, the template, what a record holds (the objective's
    records) or the cache format changes."""
    digest = hashlib.sha256()
    files = [(str(p.relative_to(task.path)), p.stat().st_size, p.stat().st_mtime_ns) for p in task.files]
    settings = {"format": CACHE_FORMAT, "template": [template.name, template.jinja()], "files": files,
                "tokenizer": tokenizer_fingerprint(tokenizer), "root": str(task.path.resolve()),
                "records": (records or Conversations()).cache_tag()}
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


def _run_encoder(task: Task, encoder: Callable[[Job], EncodedChunk], workers: int,
                 jobs: Iterator[Job]) -> Iterator[EncodedChunk]:
    """Encode the task's jobs, in order; in worker processes when the data is large enough."""
    total_bytes = sum(p.stat().st_size for p in task.files)
    if workers > 1 and total_bytes >= PARALLEL_MIN_BYTES:
        chunks = ordered_map(encoder, jobs, workers, _single_threaded_worker)
    else:
        chunks = (encoder(job) for job in jobs)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {task.name}", leave=False,
              disable=None) as progress, contextlib.closing(chunks):  # closing it ends the workers
        for chunk in chunks:
            progress.update(chunk.num_bytes)
            yield chunk


def build_cache(task: Task, tokenizer, template: Template, directory: Path, workers: int,
                seq_length: int | None = None, records: Conversations | None = None) -> None:
    """Tokenize a task into `directory`, written under a temporary name and renamed when complete."""
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        records = records or Conversations()
        _write_cache(task, records.encoder(tokenizer, template, seq_length), tmp, workers, seq_length, records)
        os.rename(tmp, directory)
    except OSError:  # fine if another process finished the same cache first
        if not directory.is_dir():
            raise
    finally:  # also on an interruption (SIGINT, SIGTERM): nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)


def _write_cache(task: Task, encoder: Callable[[Job], EncodedChunk], tmp: Path, workers: int,
                 seq_length: int | None, records: Conversations) -> None:
    """The cache's files in `tmp`; the worker processes are ended whichever way this returns."""
    starts, file_index, lines, errors = [0], [], [], []
    num_lines = as_text = cut = 0
    digest = hashlib.sha256()
    file_ids = {str(p): i for i, p in enumerate(task.files)}
    chunks = _run_encoder(task, encoder, workers, records.jobs(task))
    with open(tmp / "ids.bin", "wb") as ids_out, open(tmp / "mask.bin", "wb") as mask_out, contextlib.closing(chunks):
        for chunk in chunks:
            for array, out in ((chunk.ids, ids_out), (chunk.mask, mask_out), (chunk.lengths, None)):
                digest.update(array.tobytes())
                if out is not None:
                    out.write(array.tobytes())
            as_text += chunk.as_text
            cut += chunk.cut
            starts.extend((starts[-1] + np.cumsum(chunk.lengths)).tolist())
            file_index.extend([file_ids[chunk.path]] * len(chunk.lengths))
            lines.extend(chunk.lines.tolist())
            errors.extend(chunk.errors)
            num_lines += len(np.unique(chunk.lines)) + len(chunk.errors)  # a line's sequences share its line
    np.savez(tmp / "index.npz", starts=np.array(starts, dtype=np.int64), file_index=np.array(file_index, dtype=np.int32),
             lines=np.array(lines, dtype=np.int32))
    meta = {"format": CACHE_FORMAT, "task": task.name, "files": [str(p) for p in task.files],
            "errors": errors, "num_lines": num_lines, "num_tokens": starts[-1], "as_text": as_text,
            "digest": digest.hexdigest()[:32], "built_at": time.time(), "cut": cut,
            "cut_for": seq_length if cut else None, "parts": records.parts, **records.cache_meta()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _memmap(path: Path, dtype: type) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _reusable(directory: Path, task: Task, tokenizer, seq_length: int | None, rebuild_before: float | None) -> bool:
    """Whether the cache folder can be read as it is; a damaged one is reported (then tokenized again)."""
    if not (directory / "meta.json").exists():
        return False
    problem = cache_problem(directory, len(task.files), len(tokenizer), CACHE_FORMAT)
    if problem:
        print(f"note: the tokenized cache of task {task.name} ({directory}) is damaged: {problem}; tokenizing again",
              file=sys.stderr)
        return False
    meta = read_meta(directory)
    cut_for = meta.get("cut_for")  # records were cut for this seq_length: good for it and any shorter one
    if cut_for is not None and (seq_length is None or seq_length > cut_for):
        return False
    return rebuild_before is None or meta["built_at"] >= rebuild_before


def load_tokenized(task: Task, tokenizer, template: Template, cache_root: Path | None = None,
                   workers: int | None = None, rebuild_before: float | None = None,
                   seq_length: int | None = None, records: Conversations | None = None) -> TokenizedTask:
    """The task's tokenized records, from the cache when it matches (and checks out), else tokenized now and
    cached. A lock makes concurrent callers (the ranks of a job) tokenize once: the others wait and read the
    cache. `rebuild_before`: tokenize again when the cache was written before this time (overwrite_cache).
    `seq_length`: records far longer than it may be cut before tokenizing (see ChunkEncoder._encode_long)."""
    problem = task_name_problem(task.name)
    if problem:  # the name becomes a folder name under the cache root
        raise DataError(f"{task.path}: task name {task.name!r} {problem}")
    root = Path(cache_root) if cache_root else default_cache_root()
    directory = root / f"{task.name}-{cache_key(task, tokenizer, template, records)}"
    root.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(f"{directory.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from_cache = _reusable(directory, task, tokenizer, seq_length, rebuild_before)
        if not from_cache:
            shutil.rmtree(directory, ignore_errors=True)
            build_cache(task, tokenizer, template, directory, workers or os.cpu_count() or 1, seq_length, records)
    meta = read_meta(directory)
    index = np.load(directory / "index.npz")
    return TokenizedTask(task, _memmap(directory / "ids.bin", np.int32), _memmap(directory / "mask.bin", np.uint8),
                         index["starts"], index["file_index"], index["lines"], meta["errors"], meta["num_lines"],
                         from_cache, meta["as_text"], meta["digest"], meta.get("cut", 0), meta.get("parts", 1),
                         meta.get("chunk_length"))
