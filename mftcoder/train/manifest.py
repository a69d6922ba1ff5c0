"""Checkpoint integrity: a manifest of every file's size and SHA-256, written last at save time and checked
before a checkpoint is trusted for resume."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 8 * 1024 * 1024


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digests(directory: Path, names: list[str]) -> list[str]:
    """SHA-256 of each file, several at once (hashlib releases the GIL on large reads)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda name: file_digest(directory / name), names))


def write_manifest(directory: Path) -> None:
    """Record every file under `directory` with its size and checksum (call once all of them are written)."""
    names = _files(directory)
    entries = {name: {"bytes": (directory / name).stat().st_size, "sha256": digest}
               for name, digest in zip(names, _digests(directory, names))}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": entries}, f, indent=1)


def has_manifest(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def manifest_problems(directory: Path) -> list[str]:
    """What is wrong with a checkpoint against its manifest: missing, truncated or altered files (empty: intact). A
    manifest that cannot be read, is malformed or names a file outside the checkpoint makes the checkpoint damaged."""
    try:
        entries = read_manifest(directory)
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST} cannot be used ({exc})"]
    problems, present = [], []
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}")
        else:
            present.append(name)
    for name, digest in zip(present, _digests(directory, present)):
        if digest != entries[name]["sha256"]:
            problems.append(f"{name} does not match its checksum (altered or corrupted)")
    return problems


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's entries, each a file inside `directory` with its size and SHA-256 (ValueError if malformed)."""
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        raise ValueError("no 'files' table")
    root = directory.resolve()
    for name, entry in entries.items():
        shown = repr(name[:80])
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"the entry for {shown} is not a size and a checksum")
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\0" in name:
            raise ValueError(f"{shown} is not a path inside the checkpoint")
        if root not in (root / name).resolve().parents:  # through a symbolic link
            raise ValueError(f"{shown} leads outside the checkpoint")
    return entries
