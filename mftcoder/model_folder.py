"""Check a Hugging Face model folder before loading it: every way it can be unusable becomes one sentence that names
the setting that pointed at it (not a traceback from deep inside transformers or safetensors)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from mftcoder.config import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is damage, not a model


def check_model_folder(path: Path, key: str, trust_remote_code: bool = False, weights: bool = True) -> dict:
    """The folder's config.json, once the folder is known to load: it exists, transformers knows its model_type (or it
    brings code the user trusts), and its weight files are all there and whole (`weights`). `key` names the setting."""
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} does not exist" if not path.exists() else f"{key}: {path} is not a folder")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} is not a Hugging Face model folder (no config.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{key}: {path / 'config.json'} cannot be read ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path / 'config.json'} is not a JSON object")
    _check_model_type(config, path, key, trust_remote_code)
    if weights:
        for file in weight_files(path, key):
            if file.suffix == ".safetensors":
                check_safetensors(file, key)
    return config


def _check_model_type(config: dict, path: Path, key: str, trust_remote_code: bool) -> None:
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if "auto_map" in config:
        if trust_remote_code:
            return
        raise ConfigError(f"{key}: {path} needs its own Python code to load (config.json's auto_map names it; model_type "
                          f"{model_type!r} is not built into transformers). mftcoder runs no code from a model folder "
                          "unless told to: read that code, then set trust_remote_code: true (--trust_remote_code)")
    raise ConfigError(f"{key}: {path / 'config.json'} has model_type {model_type!r}, which transformers "
                      f"{transformers.__version__} does not know (a typo, or a model newer than this transformers?)")


def weight_files(path: Path, key: str) -> list[Path]:
    """The weight files the folder's model is stored in (all shards of a sharded one), each checked to exist."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            shards = sorted(set(json.loads(file.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{key}: {file} cannot be read ({exc})") from None
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise ConfigError(f"{key}: {path} lacks {len(missing)} of the {len(shards)} weight shard(s) {name} lists "
                              f"(first: {missing[0]})")
        return [path / shard for shard in shards]
    raise ConfigError(f"{key}: {path} holds no model weights (none of {', '.join(WEIGHT_FILES)})")


def check_safetensors(file: Path, key: str) -> None:
    """A safetensors file is whole: its header reads, and its tensors end exactly where the file does."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            if header_bytes > min(size - 8, _MAX_HEADER):
                raise ValueError(f"its header claims {header_bytes:,} bytes")
            header = json.loads(f.read(header_bytes))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ConfigError(f"{key}: {file} is damaged or truncated ({size:,} bytes; {exc})") from None
    expected = 8 + header_bytes + max(ends, default=0)
    if expected != size:
        raise ConfigError(f"{key}: {file} is truncated or damaged: it has {size:,} bytes, its header describes "
                          f"{expected:,}")
