"""The shipped GPT-NeoX-20B tokenizer reproduces llama.cpp's expected token ids.

The vectors in ``tests/data/tokenizer_vectors`` are llama.cpp's ``ggml-vocab-*.gguf.inp``/``.out``
pairs (see ``scripts/build_tokenizer.py``); ``mpt`` uses the GPT-NeoX-20B vocabulary.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "mftcoder" / "assets" / "tokenizer"
VECTORS_DIR = ROOT / "tests" / "data" / "tokenizer_vectors"
SEPARATOR = "\n__ggml_vocab_test__\n"
VECTOR_FILES = sorted(p.name.removesuffix(".inp") for p in VECTORS_DIR.glob("*.gguf.inp"))
MIN_CASES = 40  # llama.cpp ships 46 cases per file


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def read_vectors(stem: str) -> list[tuple[str, list[int]]]:
    """Parse one llama.cpp .inp/.out pair the way llama.cpp's test-tokenizer-0 does."""
    raw = (VECTORS_DIR / f"{stem}.inp").read_text(encoding="utf-8")
    texts = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):
        texts.pop()
    lines = (VECTORS_DIR / f"{stem}.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines), f"{stem}: {len(texts)} inputs vs {len(lines)} outputs"
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines)]


CASES = [
    pytest.param(text, expected, id=f"{stem}-{i:02d}")
    for stem in VECTOR_FILES
    for i, (text, expected) in enumerate(read_vectors(stem))
]


def test_vector_files_present() -> None:
    assert "ggml-vocab-mpt.gguf" in VECTOR_FILES
    for stem in VECTOR_FILES:
        assert len(read_vectors(stem)) >= MIN_CASES, stem
    assert len(CASES) >= MIN_CASES * len(VECTOR_FILES)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_llama_cpp_vector(text: str, expected: list[int]) -> None:
    assert tokenizer().encode(text, add_special_tokens=False) == expected
    # Encoding adds no bos/eos by default.
    assert tokenizer().encode(text) == expected


def test_special_tokens() -> None:
    tok = tokenizer()
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == 0
    assert tok.pad_token == "<|padding|>"
    assert tok.pad_token_id == 1
    assert tok.model_max_length == 2048
    assert tok.chat_template is None
    assert tok("hello")["input_ids"] == tok.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize("marker", ["<|role_start|>", "<|role_end|>"])
def test_role_markers_are_single_tokens(marker: str) -> None:
    tok = tokenizer()
    ids = tok.encode(marker)
    assert len(ids) == 1
    assert ids[0] >= 50277  # appended after the GPT-NeoX-20B vocabulary
    assert tok.decode(ids) == marker


def test_role_markers_in_context() -> None:
    tok = tokenizer()
    start, end = (tok.convert_tokens_to_ids(t) for t in ("<|role_start|>", "<|role_end|>"))
    text = "<|role_start|>human<|role_end|>def f():"
    ids = tok.encode(text)
    assert ids[0] == start
    assert ids.count(start) == 1 and ids.count(end) == 1
    assert ids[: ids.index(end) + 1] == [start, *tok.encode("human"), end]
    assert ids[ids.index(end) + 1 :] == tok.encode("def f():")
    # Non-special: kept when decoding, even with skip_special_tokens.
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n\tdef bar(self):\n\t\treturn 'baz'\n\n\n",
    "    # leading spaces\n        x = [1,  2,   3]\n",
    "s = \"héllo wörld — ünïcödé ✓ 你好 🚀\"\nprint(s)\r\n",
    "if x:\n\t  pass  \t\n# trailing   ",
    "<|role_start|>human<|role_end|>def f():\n    pass\n<|endoftext|>",
]


@pytest.mark.parametrize("text", SNIPPETS)
def test_round_trip(text: str) -> None:
    tok = tokenizer()
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [s for s in SNIPPETS if s.isascii()])
def test_offsets_cover_text_exactly(text: str) -> None:
    tok = tokenizer()
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    assert "".join(text[a:b] for a, b in offsets) == text
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(offsets, offsets[1:]))


@pytest.mark.parametrize("text", [s for s in SNIPPETS if not s.isascii()])
def test_offsets_non_ascii(text: str) -> None:
    """A multi-byte character may be split over several byte-level tokens that all point at
    that character, so spans can repeat/overlap; they still cover the text in order."""
    tok = tokenizer()
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert all(a1 <= a2 and b1 <= b2 for (a1, b1), (a2, b2) in zip(offsets, offsets[1:]))
    covered = set()
    for a, b in offsets:
        covered.update(range(a, b))
    assert covered == set(range(len(text)))


def test_offsets_keep_leading_spaces() -> None:
    tok = tokenizer()
    text = "    def f(x):\n        return x  # two"
    enc = tok(text, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    assert "".join(pieces) == text
    assert pieces[0] == "    "  # the 4-space added token, offsets untrimmed
    # Each token's offsets slice back to exactly the text that token decodes to.
    for token_id, piece in zip(enc["input_ids"], pieces):
        assert tok.decode([token_id]) == piece
