"""Raw-text documents for continued pretraining: `{"content": ...}` JSONL lines and whole source files, each
tokenized as [BOS] text EOS and cut into chunks of at most seq_length tokens that overlap by one token."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mftcoder.data.records import MAX_RECORD_BYTES, BadRecord, parse_json_object
from mftcoder.data.tasks import Task
from mftcoder.data.template import control_token_pattern, tokenizer_adds_bos
from mftcoder.data.tokenize import Conversations, EncodedChunk, Job, Template


def read_document(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> str | BadRecord:
    """A whole file's text, or BadRecord (unreadable, not a regular file, over max_bytes, not UTF-8); a UTF-8 BOM is
    dropped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there since the folder was listed cannot block
    except OSError as exc:
        return BadRecord(f"cannot be read ({exc.strerror})")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return BadRecord("not a regular file (a FIFO, socket or device); not read")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        return BadRecord(f"file is {os.path.getsize(path):,} bytes, over the limit of {max_bytes:,}")
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(f"not valid UTF-8: {exc.reason} (byte 0x{raw[exc.start]:02x} at offset {exc.start})")


def document_text(record: dict) -> str:
    """The text of a `{"content": ...}` record (other keys are ignored), or BadRecord."""
    if "content" not in record:
        raise BadRecord("missing 'content' (a pretraining record is {\"content\": \"text\"})")
    content = record["content"]
    if not isinstance(content, str):
        raise BadRecord(f"'content': expected a string, got {type(content).__name__}")
    return content


def chunk_starts(length: int, chunk_length: int) -> range:
    """Where the chunks of a document of `length` tokens start: every chunk_length - 1 tokens, so consecutive
    chunks share one token and each token after the first is a target in exactly one chunk; the last chunk holds
    at least two tokens."""
    return range(0, max(length - 1, 1), chunk_length - 1)


@dataclass
class DocumentEncoder:
    """Tokenize a job of documents (JSONL lines, or one source file) into chunks; picklable for worker processes.
    Control-token text inside a document is encoded as the characters it is, as in SFT's message contents."""

    tokenizer: object
    template: Template
    chunk_length: int

    def __call__(self, job: Job) -> EncodedChunk:
        path, items = job
        numbers, texts, errors = _texts(path, items)
        tokenizer = self.tokenizer
        controls = control_token_pattern(tokenizer, self.template.jinja())
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                            verbose=False)["input_ids"] if texts else []  # (no warning: long documents are chunked)
        head = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
        chunks, lines, as_text = [], [], 0
        for number, text, ids in zip(numbers, texts, encoded):
            literals = set(controls.findall(text))
            made = next((t for t in sorted(literals) if tokenizer.convert_tokens_to_ids(t) in ids), None)
            if made is not None:
                errors[number] = (f"{path}:{number}: {made!r} in a document cannot be kept as text: this tokenizer "
                                  "makes the control token from its characters")
                continue
            as_text += bool(literals)
            document = np.asarray(head + ids + [tokenizer.eos_token_id], dtype=np.int32)
            for start in chunk_starts(len(document), self.chunk_length):
                chunks.append(document[start:start + self.chunk_length])
                lines.append(number)
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        mask = np.ones(int(lengths.sum()), dtype=np.uint8)
        mask[np.cumsum(lengths) - lengths] = 0  # each chunk's first token: a target of the chunk before, if any
        return EncodedChunk(np.concatenate(chunks) if chunks else np.zeros(0, np.int32), mask, lengths,
                            np.array(lines, dtype=np.int32), [errors[n] for n in sorted(errors)], path,
                            sum(len(t) + 1 for t in texts), as_text)


def _texts(path: str, items: list[tuple[int, str | BadRecord]]) -> tuple[list[int], list[str], dict[int, str]]:
    """The documents of a job (line numbers and texts) and its bad records ({line: 'file:line: reason'})."""
    is_jsonl = path.endswith(".jsonl")
    numbers, texts, errors = [], [], {}
    for number, text in items:
        try:
            if isinstance(text, BadRecord):
                raise text
            content = document_text(parse_json_object(text)) if is_jsonl else text
            if not content.strip():
                raise BadRecord("'content' is empty" if is_jsonl else "file is empty (no text to learn from)")
            numbers.append(number)
            texts.append(content)
        except BadRecord as exc:
            errors[number] = f"{path}:{number}: {exc}"
    return numbers, texts, errors


class Documents(Conversations):
    """What a pretraining task holds: `{"content": ...}` JSONL records and whole files ending in `extensions`, each
    one document; a record is one chunk of a document (position 0 of a chunk has no context: mask 0; every other
    token is a target). The cache depends on the chunk length, so on seq_length."""

    def __init__(self, chunk_length: int, extensions: tuple[str, ...] = (".py",)):
        self.chunk_length = chunk_length
        self.suffixes = (".jsonl", *(e for e in extensions if e != ".jsonl"))

    def conversations(self, record: dict) -> tuple:
        raise TypeError("pretraining documents are raw text, not conversations")

    def cache_tag(self) -> str:
        return f"pretrain-documents-{self.chunk_length}"

    def encoder(self, tokenizer, template: Template, seq_length: int | None) -> DocumentEncoder:
        """Chunks of chunk_length tokens (the run's seq_length, which the cache key holds through cache_tag)."""
        if seq_length is not None and seq_length != self.chunk_length:
            raise ValueError(f"documents chunked for seq_length {self.chunk_length} tokenized for {seq_length}")
        return DocumentEncoder(tokenizer, template, self.chunk_length)

    def jobs(self, task: Task) -> Iterator[Job]:
        """JSONL files by lines (as for SFT), every other file whole: one document, line 1."""
        for path in task.files:
            if path.name.endswith(".jsonl"):
                yield from super().jobs(Task(task.id, task.name, task.path, (path,)))
            else:
                yield str(path), [(1, read_document(path))]

    def cache_meta(self) -> dict:
        return {"chunk_length": self.chunk_length}
