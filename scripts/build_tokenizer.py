#!/usr/bin/env python
"""Build the GPT-NeoX-20B tokenizer in Hugging Face format from llama.cpp's vocab-only GGUF.

The source is either ``ggml-vocab-gpt-neox.gguf`` itself or the llama-cpp-python sdist
(``llama_cpp_python-<version>.tar.gz``), which vendors llama.cpp and ships that file under
``vendor/llama.cpp/models/`` together with llama.cpp's tokenizer test vectors.

The tokenizer is rebuilt with the ``tokenizers`` library to match the original
``EleutherAI/gpt-neox-20b`` ``tokenizer.json`` pipeline:

* model: byte-level BPE over ids 0..50253 with the GGUF merges, in rank order;
* normalizer: NFC (as in the original; llama.cpp itself does not normalize, which makes no
  difference for NFC input and none for any of llama.cpp's test vectors);
* pre-tokenizer: ByteLevel(add_prefix_space=False, use_regex=True);
* decoder: ByteLevel; post-processor: ByteLevel(trim_offsets=False) so that
  ``return_offsets_mapping`` gives exact character spans (whitespace included);
* GGUF CONTROL tokens (``<|endoftext|>``, ``<|padding|>``) become special added tokens;
  GGUF USER_DEFINED runs of 2..24 spaces (ids 50254..50276) become non-special added
  tokens, as in the original;
* the ``[PAD<id>]`` placeholders llama.cpp's converter appends to reach the model's
  embedding size (50432) are not part of the tokenizer and are dropped;
* two non-special added tokens ``<|role_start|>`` and ``<|role_end|>`` are appended.

Usage::

    python scripts/build_tokenizer.py /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz \\
        --vectors-out tests/data/tokenizer_vectors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "mftcoder" / "assets" / "tokenizer"

GGUF_NAME = "ggml-vocab-gpt-neox.gguf"
# llama.cpp ships test vectors for these vocab files; mpt uses the GPT-NeoX-20B vocabulary.
VECTOR_VOCABS = ("gpt-neox", "mpt")
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
ROLE_TOKENS = ("<|role_start|>", "<|role_end|>")
MODEL_MAX_LENGTH = 2048

# GGUF token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
PAD_PLACEHOLDER = re.compile(r"\[PAD(\d+)\]")


@dataclass
class GGUFVocab:
    """Tokenizer data read from a vocab-only GGUF file."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    metadata: dict[str, object]


@dataclass
class SourceFiles:
    """Local paths of the files taken from the source (gguf and optional test vectors)."""

    gguf: Path
    vectors: dict[str, Path]  # file name -> local path
    mpt_gguf: Path | None


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vector_names() -> list[str]:
    """File names of the llama.cpp test vectors that apply to this vocabulary."""
    return [f"ggml-vocab-{name}.gguf.{ext}" for name in VECTOR_VOCABS for ext in ("inp", "out")]


def collect_sources(source: Path, workdir: Path) -> SourceFiles:
    """Locate the gguf and test vectors, extracting them from an sdist tarball if needed."""
    wanted = [GGUF_NAME, "ggml-vocab-mpt.gguf", *vector_names()]
    found: dict[str, Path] = {}
    if source.suffix == ".gguf":
        for name in wanted:
            candidate = source if name == GGUF_NAME else source.with_name(name)
            if candidate.is_file():
                found[name] = candidate
    else:
        with tarfile.open(source, "r:*") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in wanted and "/models/" in member.name:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    found[name] = workdir / name
                    found[name].write_bytes(extracted.read())
    if GGUF_NAME not in found:
        sys.exit(f"error: {GGUF_NAME} not found in {source}")
    vectors = {name: found[name] for name in vector_names() if name in found}
    return SourceFiles(found[GGUF_NAME], vectors, found.get("ggml-vocab-mpt.gguf"))


def read_gguf_vocab(path: Path) -> GGUFVocab:
    """Read tokens, token types, merges and scalar metadata from a GGUF file."""
    reader = GGUFReader(path)
    fields = reader.fields
    metadata = {
        key: field.contents()
        for key, field in fields.items()
        if key.startswith(("general.", "tokenizer.ggml.")) and len(field.data) == 1
    }
    return GGUFVocab(
        tokens=list(fields["tokenizer.ggml.tokens"].contents()),
        token_types=[int(t) for t in fields["tokenizer.ggml.token_type"].contents()],
        merges=list(fields["tokenizer.ggml.merges"].contents()),
        metadata=metadata,
    )


def strip_pad_placeholders(vocab: GGUFVocab) -> int:
    """Drop the trailing ``[PAD<id>]`` placeholders; return how many were removed."""
    end = len(vocab.tokens)
    while end > 0:
        match = PAD_PLACEHOLDER.fullmatch(vocab.tokens[end - 1])
        if not match or int(match.group(1)) != end - 1:
            break
        end -= 1
    removed = len(vocab.tokens) - end
    del vocab.tokens[end:], vocab.token_types[end:]
    return removed


def build_backend(vocab: GGUFVocab) -> Tokenizer:
    """Build the ``tokenizers`` pipeline (see module docstring) from the GGUF vocab."""
    types = vocab.token_types
    base_size = next((i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED), len(types))
    if any(t not in (TOKEN_NORMAL, TOKEN_CONTROL) for t in types[:base_size]):
        raise ValueError("unexpected token type inside the BPE vocabulary")
    if any(t != TOKEN_USER_DEFINED for t in types[base_size:]):
        raise ValueError("user-defined tokens are expected to follow the BPE vocabulary")

    bpe_vocab = {token: i for i, token in enumerate(vocab.tokens[:base_size])}
    if len(bpe_vocab) != base_size:
        raise ValueError("duplicate tokens in the GGUF vocabulary")
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    if any(len(m) != 2 for m in merges):
        raise ValueError("malformed merge rule")

    tokenizer = Tokenizer(models.BPE(vocab=bpe_vocab, merges=merges, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=True
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)

    control = [vocab.tokens[i] for i in range(base_size) if types[i] == TOKEN_CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    # Whitespace runs: added tokens (matched before BPE), ids must stay as in the GGUF.
    user_defined = vocab.tokens[base_size:]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in user_defined])
    for expected_id, token in enumerate(vocab.tokens):
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(f"id mismatch for {token!r}")

    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    return tokenizer


def read_vectors(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """Parse a llama.cpp ``.inp``/``.out`` pair into (text, expected ids) cases."""
    raw = inp.read_text(encoding="utf-8")
    texts = raw.split(VECTOR_SEPARATOR)
    if raw.endswith(VECTOR_SEPARATOR):
        texts.pop()  # llama.cpp stops at the end of the data, leaving no trailing empty case
    lines = out.read_text(encoding="utf-8").splitlines()
    if len(texts) != len(lines):
        raise ValueError(f"{inp.name}: {len(texts)} inputs but {len(lines)} outputs")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines)]


def check_vectors(out_dir: Path, vectors: dict[str, Path]) -> int:
    """Encode every test vector with the saved tokenizer; return the number passed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    passed = 0
    for name in VECTOR_VOCABS:
        inp, out = (vectors.get(f"ggml-vocab-{name}.gguf.{ext}") for ext in ("inp", "out"))
        if inp is None or out is None:
            continue
        for text, expected in read_vectors(inp, out):
            got = tokenizer.encode(text, add_special_tokens=False)
            if got != expected:
                raise SystemExit(f"vector mismatch ({name}) for {text!r}: {got} != {expected}")
            passed += 1
    return passed


def write_readme(out_dir: Path, source: Path, files: SourceFiles, vocab: GGUFVocab,
                 role_ids: list[int], n_pad: int, total: int) -> None:
    """Write a README.md with the provenance and license of the tokenizer."""
    gguf_sha = sha256_of(files.gguf)
    source_line = f"`{source.name}` (sha256 `{sha256_of(source)}`)" if source.suffix != ".gguf" else "—"
    vector_lines = "\n".join(
        f"| `{name}` | `{sha256_of(path)}` |" for name, path in sorted(files.vectors.items())
    )
    text = f"""# GPT-NeoX-20B tokenizer (Hugging Face format)

Generated by `scripts/build_tokenizer.py`; do not edit by hand.

## Provenance

| | |
|---|---|
| source archive | {source_line} |
| vocab file | `vendor/llama.cpp/models/{GGUF_NAME}` |
| vocab sha256 | `{gguf_sha}` |
| GGUF `general.name` | `{vocab.metadata.get("general.name")}` |

The GGUF file holds the vocabulary, merges and token types of `EleutherAI/gpt-neox-20b`.
Test vectors (llama.cpp's expected token ids, copied to `tests/data/tokenizer_vectors`):

| file | sha256 |
|---|---|
{vector_lines}

`ggml-vocab-mpt.gguf` carries exactly the same tokens, merges and token types as the
GPT-NeoX vocab file, so its vectors apply unchanged.

## Pipeline

- BPE (byte level) with the {len(vocab.merges)} GGUF merges; NFC normalizer (as in the
  original `tokenizer.json`); ByteLevel pre-tokenizer (`add_prefix_space=false`, GPT-2 regex);
  ByteLevel decoder; ByteLevel post-processor with `trim_offsets=false` (exact offsets).
- `<|endoftext|>` (id 0) is bos/eos/unk, `<|padding|>` (id 1) is pad; no special tokens
  are added when encoding (`add_bos_token`/`add_eos_token` false).
- Ids 50254..50276 are runs of 24..2 spaces, added tokens as in the original.
- The {n_pad} `[PAD<id>]` placeholders that llama.cpp appends to reach the model's embedding
  size are dropped.
- Non-special added tokens `{ROLE_TOKENS[0]}` = {role_ids[0]} and `{ROLE_TOKENS[1]}` = {role_ids[1]}
  are appended (always one token each, kept in decoded text).
- `len(tokenizer)` = {total}. No chat template is set here.
- llama.cpp does not NFC-normalize, so for non-NFC input (e.g. `e` + combining accent) the ids
  differ from llama.cpp's but match the original Hugging Face tokenizer; such text does not
  round-trip byte-exactly through encode/decode.

## Regenerate

```
pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp
python scripts/build_tokenizer.py /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz \\
    --vectors-out tests/data/tokenizer_vectors
```

## License

The GPT-NeoX-20B tokenizer (vocabulary and merges) is released by EleutherAI under the
Apache License 2.0. The container it was taken from, llama.cpp (vendored by llama-cpp-python),
including its tokenizer test vectors, is MIT licensed
("Copyright (c) 2023-2026 The ggml authors").
"""
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def write_vectors_readme(vectors_dir: Path, source: Path, files: SourceFiles) -> None:
    """Write the provenance and MIT notice of the copied test vectors."""
    names = "\n".join(f"- `{name}`" for name in sorted(files.vectors))
    text = f"""# llama.cpp tokenizer test vectors

Copied by `scripts/build_tokenizer.py` from `{source.name}` (`vendor/llama.cpp/models/`):

{names}

`*.inp`: test strings, each followed by a line `__ggml_vocab_test__`; `*.out`: one line of
space-separated expected token ids per string. The `mpt` vocabulary is identical to GPT-NeoX-20B's
(llama.cpp ships no vectors for `ggml-vocab-gpt-neox.gguf` itself).

From llama.cpp, MIT License, Copyright (c) 2023-2026 The ggml authors.
"""
    (vectors_dir / "README.md").write_text(text, encoding="utf-8")


def save_hf_tokenizer(backend: Tokenizer, out_dir: Path) -> None:
    """Save ``backend`` as a ``PreTrainedTokenizerFast`` directory with our settings."""
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(out_dir)
    # transformers drops these keys on save; record them explicitly (the post-processor in
    # tokenizer.json already adds no special tokens).
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config.update(add_bos_token=False, add_eos_token=False)
    # v5 saves "TokenizersBackend"; this name resolves to the same class and also to v4's.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path,
                        help=f"{GGUF_NAME} or a llama-cpp-python sdist (.tar.gz)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help="output tokenizer directory (default: %(default)s)")
    parser.add_argument("--vectors-out", type=Path, default=None,
                        help="also copy llama.cpp's test vectors into this directory")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        files = collect_sources(args.source, Path(tmp))
        vocab = read_gguf_vocab(files.gguf)
        if vocab.metadata.get("tokenizer.ggml.model") != "gpt2":
            sys.exit("error: expected a byte-level BPE ('gpt2') GGUF vocabulary")
        if files.mpt_gguf is not None:
            mpt = read_gguf_vocab(files.mpt_gguf)
            if (mpt.tokens, mpt.token_types, mpt.merges) != (vocab.tokens, vocab.token_types, vocab.merges):
                sys.exit("error: the mpt vocabulary differs; its test vectors would not apply")
        n_pad = strip_pad_placeholders(vocab)
        backend = build_backend(vocab)

        args.out_dir.mkdir(parents=True, exist_ok=True)
        save_hf_tokenizer(backend, args.out_dir)
        role_ids = [backend.token_to_id(t) for t in ROLE_TOKENS]
        total = backend.get_vocab_size(with_added_tokens=True)
        write_readme(args.out_dir, args.source.resolve(), files, vocab, role_ids, n_pad, total)

        missing = sorted(set(vector_names()) - set(files.vectors))
        for name in missing:
            print(f"note: {name} not present in the source")
        if args.vectors_out is not None:
            args.vectors_out.mkdir(parents=True, exist_ok=True)
            for name, path in sorted(files.vectors.items()):
                shutil.copyfile(path, args.vectors_out / name)
                print(f"copied {name} -> {args.vectors_out}")
            write_vectors_readme(args.vectors_out, args.source.resolve(), files)
        passed = check_vectors(args.out_dir, files.vectors)

    print(f"wrote {args.out_dir} (len(tokenizer) = {total}, dropped {n_pad} [PAD] placeholders)")
    for token, token_id in zip(ROLE_TOKENS, role_ids):
        print(f"{token} -> id {token_id}")
    print(f"llama.cpp test vectors passed: {passed}")


if __name__ == "__main__":
    main()
