"""Fold a LoRA adapter into its base model and write a standard Hugging Face model directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from mftcoder.data.records import DataError
from mftcoder.data.template import saved_template, stop_token_ids
from mftcoder.model import set_special_token_ids
from mftcoder.model_folder import check_model_folder

LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


class AdapterMismatch(DataError):
    """The adapter was not trained on this base model."""


def layer_sizes(module: torch.nn.Module) -> tuple[int | None, int | None]:
    """(input, output) features of a layer LoRA can sit on: nn.Linear, or GPT-2's Conv1D (a linear layer whose weight
    is stored transposed, [in, out]); (None, None) for anything else."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return getattr(module, "in_features", None), getattr(module, "out_features", None)


def check_adapter_fits(base: torch.nn.Module, adapter_dir: Path) -> None:
    """Every LoRA matrix must sit on a linear layer of the base with matching in/out features."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterMismatch(f"{adapter_dir}: not a PEFT adapter (adapter_config.json and "
                              "adapter_model.safetensors expected)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatch(f"{adapter_dir}: a {config['peft_type']} adapter; only LoRA can be merged")
    modules = dict(base.named_modules())
    problems = []
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            match = LORA_KEY.match(key)
            if not match:
                continue
            name, part, shape = match["module"], match["part"], f.get_slice(key).get_shape()
            module = modules.get(name)
            if module is None:
                problems.append(f"the adapter has weights for '{name}', which this base model does not have")
                continue
            expected = layer_sizes(module)[0 if part == "A" else 1]
            actual = shape[1] if part == "A" else shape[0]
            if expected != actual:
                side = "input" if part == "A" else "output"
                problems.append(f"'{name}': the adapter expects {side} size {actual}, the base has {expected}")
    if problems:
        arch = getattr(base.config, "model_type", "?")
        raise AdapterMismatch(f"{adapter_dir} does not belong to this base model ({arch}): "
                              + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))


def check_out_folder(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an `--out` that is (or holds, or lies inside) an input, or an existing non-empty folder without
    `--overwrite`; checked before any work."""
    out = out_dir.resolve()
    for path in inputs:
        source = path.resolve()
        if out == source or source in out.parents or out in source.parents:
            raise DataError(f"--out {out_dir}: it overlaps the input folder {path}; the merged model goes to a folder "
                            "of its own (its files would replace or mix with the input's)")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"--out {out_dir}: the folder exists and is not empty; its files would mix with the merged "
                        "model's: choose another folder, or pass --overwrite to replace it")


@contextlib.contextmanager
def folder_in_place(out_dir: Path):
    """Yield a temporary sibling folder to write into; only once the body completes does it replace `out_dir` (a merge
    stopped part-way leaves `out_dir` as it was, and nothing else behind unless the process was killed outright)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # (with the user's umask, as the folder it becomes)
    try:
        yield tmp
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, max_shard_size: str = "5GB",
          trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    """Load the base (in its own dtype), check and apply the adapter, merge in place, save with the training
    tokenizer (chat template, EOS, pad) into a new folder (see `folder_in_place`). Peak memory stays near one copy
    of the weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(base_dir, "--base", trust_remote_code)
    if not adapter_dir.is_dir():
        raise DataError(f"{adapter_dir}: adapter folder does not exist")
    check_out_folder(out_dir, [base_dir, adapter_dir], overwrite)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto", trust_remote_code=trust_remote_code)
    check_adapter_fits(base, adapter_dir)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_special_token_ids(merged, tokenizer, stop_token_ids(tokenizer, saved_template(tokenizer)))
    with folder_in_place(out_dir) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
    return out_dir
