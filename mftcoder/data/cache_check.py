"""Checks of a tokenized-data cache folder before it is used: its files must agree with each other and with the
tokenizer, so a damaged cache is tokenized again instead of failing later inside a batch."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

META_KEYS = {"format": int, "errors": list, "num_lines": int, "num_tokens": int, "as_text": int, "digest": str,
             "built_at": (int, float)}
CHUNK = 1 << 24  # tokens checked at a time: bounded memory for a cache of any size


def read_meta(directory: Path) -> dict:
    """meta.json of a cache folder; ValueError (a sentence) when it is unreadable or lacks a field."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"meta.json cannot be read ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a mapping")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"meta.json has no valid {key!r}")
    return meta


def cache_problem(directory: Path, num_files: int, vocab_size: int, cache_format: int) -> str | None:
    """Why the cache in `directory` cannot be used, or None: meta, index and token files must agree (sizes,
    offsets, line numbers), token ids must lie in the vocabulary and mask values be 0 or 1."""
    try:
        meta = read_meta(directory)
        with np.load(directory / "index.npz", allow_pickle=False) as index:
            starts, file_index, lines = index["starts"], index["file_index"], index["lines"]
        ids_size, mask_size = ((directory / name).stat().st_size for name in ("ids.bin", "mask.bin"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return str(exc) if isinstance(exc, ValueError) and "meta.json" in str(exc) else \
            f"its files cannot be read ({type(exc).__name__})"
    tokens, records = meta["num_tokens"], len(starts) - 1
    if meta["format"] != cache_format:
        return f"format {meta['format']}, expected {cache_format}"
    if (ids_size, mask_size) != (4 * tokens, tokens):
        return f"ids.bin holds {ids_size:,} bytes and mask.bin {mask_size:,}; meta.json says {tokens:,} tokens"
    shapes_ok = starts.ndim == file_index.ndim == lines.ndim == 1 and records >= 0
    if not shapes_ok or starts.dtype != np.int64 or len(file_index) != records or len(lines) != records:
        return "index.npz does not hold one offset, file and line per record"
    if starts[0] != 0 or starts[-1] != tokens or np.any(np.diff(starts) < 0):
        return "the record offsets in index.npz do not cover the token file in order"
    if records and (file_index.min() < 0 or file_index.max() >= num_files or lines.min() < 1):
        return "index.npz names files or lines that do not exist"
    parts = meta.get("parts", 1)  # sequences per record
    if not isinstance(parts, int) or parts < 1 or records % parts:
        return f"index.npz holds {records} sequences, not whole records of {parts}"
    kept = records // parts
    chunk_length = meta.get("chunk_length")  # pretraining: a document is one or more records of at most this length
    if chunk_length is not None:
        if not isinstance(chunk_length, int) or chunk_length < 2 or (records and np.diff(starts).max() > chunk_length):
            return f"index.npz holds records longer than the chunk length {chunk_length} of meta.json"
        kept = int(records and 1 + np.count_nonzero((np.diff(file_index) != 0) | (np.diff(lines) != 0)))
    if meta["num_lines"] != kept + len(meta["errors"]):
        what = "documents" if chunk_length is not None else "records"
        return f"meta.json counts {meta['num_lines']} lines, but holds {kept} {what} and {len(meta['errors'])} errors"
    ids = np.memmap(directory / "ids.bin", dtype=np.int32, mode="r") if tokens else np.zeros(0, np.int32)
    mask = np.memmap(directory / "mask.bin", dtype=np.uint8, mode="r") if tokens else np.zeros(0, np.uint8)
    for start in range(0, tokens, CHUNK):
        part = ids[start:start + CHUNK]
        if part.min() < 0 or part.max() >= vocab_size:
            return f"token ids outside the tokenizer's vocabulary of {vocab_size:,} (from token {start:,} on)"
        if mask[start:start + CHUNK].max() > 1:
            return f"loss-mask values other than 0 and 1 (from token {start:,} on)"
    return None
