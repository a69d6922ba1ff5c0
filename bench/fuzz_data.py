#!/usr/bin/env python
"""Fuzz `mftcoder data check`: no input line may crash it, and every bad line is reported as `path:line: reason`.

Real records (the shipped demo data plus records built here) are mutated at random (seeded): bytes flipped,
inserted, deleted or cut; invalid UTF-8, BOMs, NULs and CRs; JSON escapes such as lone surrogates; huge
strings, deep nesting, values of the wrong JSON type (null, numbers, 1e400, NaN, a 5000-digit integer),
duplicate keys, unknown or re-cased roles, empty or blank contents, the template's control tokens,
zero-width, right-to-left and emoji characters inside contents, extra or missing keys, the prompt/answer
form. Mutated lines are mixed with good ones into JSONL files in one to three task folders, and the real CLI
checks them (`python -m mftcoder data check ...` in a subprocess, a few hundred mutated lines per run).

Each run is judged against an independent oracle (`expected_bad`, which reads a line the way the data rules
in the README describe it): the exit code is exactly 0 or 1 as the policy says, no "Traceback" appears, every
output line is either a `path:line: reason` line, the report table or its summary lines, the reported lines
are exactly the lines the oracle calls bad, and the table's counts add up. A failed run's task folders,
command, output and offending lines are kept under `--out` for reproduction, and the script exits 1.

    .venv/bin/python bench/fuzz_data.py [--mutations 5000] [--seed 0] [--out DIR]

tests/test_fuzz_data.py runs the same engine in-process on a few hundred mutations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from mftcoder.data.records import MAX_RECORD_BYTES

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "mftcoder" / "assets" / "demo_data"  # the shipped demo data: three tasks, 300 records each
ROLES = {"system": "system", "human": "human", "bot": "bot", "user": "human", "assistant": "bot"}
CONTROL_TEXT = ["<|role_start|>", "<|role_end|>", "<|endoftext|>", "</s>", "<s>", "<|im_start|>", "<|im_end|>",
                "<|role_start|>bot<|role_end|>", "<s>human\n", "<|padding|>", "<unk>", "<|endoftext|><|endoftext|>"]
EXOTIC_TEXT = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u202e", "\u202d", "\u200f", "\u061c", "\u2028",
               "\u2029", "\u0085", "\u00a0", "\u3000", "\U0001f600", "\U0001f468\u200d\U0001f4bb", "\U0001f1fa\U0001f1f8",
               "e\u0301", "\u0628\u0627\u064a\u062b\u0648\u0646", "\ue000", "\ue0010\ue001", "\U0010ffff", "\x00",
               "\x1b[31m", "\x7f", "\ufffd", "\U0001d54f", "\u0000\u0000", "\t", "\x0b\x0c"]
ESCAPES = ["\\ud800", "\\udc00", "\\uDBFF", "\\udfff", "\\ud83d\\ude00", "\\ud83d", "\\ude00\\ud83d", "\\ud800\\u0041",
           "\\u0000", "\\u001b", "\\u2028", "\\uffff", "\\ufeff", "\\x41", "\\u12", "\\U0001F600", "\\", "\\/", "\\'"]
WRONG_VALUES = ["null", "0", "-0", "1", "-1.5e-7", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "true",
                "false", "[]", "{}", '[""]', '{"role": "bot"}', '""', '" "', "9" * 5000, "-" + "1" * 4400,
                "1" + "0" * 400 + ".5", "123456789012345678901234567890"]
ODD_ROLES = ["bott", "Human", "HUMAN", "Bot", "BOT", "System", "User", "ASSISTANT", "human ", " bot", "", "gpt",
             "model", "function", "tool", "\u7528\u6237", "hu\nman", "bot\x00", "\x1b[31mbot\x1b[0m", "b\u200bot",
             "\u202ebot", "r" * 5000, "human\r\n" * 3, "'\"", "{role}"]
BLANKS = ["", " ", "\n", "\t\n ", "\r\n", "\u3000", "\u00a0", "\u2028", "\x1c\x1d", "\u200b", "\ufeff", "\x00",
          " \u200b "]


class Raw(str):
    """JSON text written as it is (a literal such as NaN or 1e400, an escape, a deep nesting)."""


@dataclass
class Pairs:
    """A JSON object written from key/value pairs, so that a key may appear twice."""

    items: list[tuple[str, object]]


def dumps(value: object, ascii_only: bool = True) -> str:
    """JSON text of a record that may hold Raw pieces and Pairs objects."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: {dumps(v, ascii_only)}"
                               for k, v in value.items) + "}"
    if isinstance(value, dict):
        return dumps(Pairs(list(value.items())), ascii_only)
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


# ---------------------------------------------------------------------------------------------- seed records

def demo_records(limit_per_task: int | None = None) -> list[dict]:
    """The shipped demo data (mftcoder/assets/demo_data/*/train.jsonl), parsed."""
    records = []
    for path in sorted(DEMO_DATA.glob("*/train.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        records += [json.loads(line) for line in lines[:limit_per_task]]
    return records


def built_records() -> list[dict]:
    """Valid records of every shape the README allows: system turns, aliases, prompt/answer, odd but legal text."""
    def chat(*turns: tuple[str, str]) -> dict:
        return {"chat_rounds": [{"role": r, "content": c} for r, c in turns]}

    return [
        chat(("human", "Add one."), ("bot", "x + 1")),
        chat(("system", "You are terse."), ("human", "Sort xs."), ("bot", "sorted(xs)"),
             ("human", "Reversed?"), ("bot", "sorted(xs, reverse=True)")),
        chat(("user", "Square it."), ("assistant", "x * x")),
        chat(("system", "Answer in French."), ("user", "Bonjour ?"), ("assistant", "Bonjour, ça va \u00e0 merveille.")),
        {"prompt": "Reverse a string in Python.", "answer": "s[::-1]"},
        {"system": "Be brief.", "prompt": "Length of a list?", "answer": "len(xs)"},
        {"system": None, "prompt": "Empty dict?", "answer": "{}"},
        chat(("human", "What ends a GPT-NeoX document?"), ("bot", "The <|endoftext|> token; a `</s>` or <s> is other models'.")),
        chat(("human", "Print the markers."), ("bot", "print('<|role_start|>bot<|role_end|>')")),
        chat(("human", "\u05e9\u05dc\u05d5\u05dd \u202eabc\u202c and \U0001f600"), ("bot", "\u200bzero\u200dwidth\u2060")),
        chat(("human", "Tabs\tand\r\ncarriage returns"), ("bot", "line1\nline2\r\n\tindented")),
        chat(("human", "NUL inside?"), ("bot", "a\x00b")),
        chat(("human", "Private use"), ("bot", "\ue000 0 \ue001")),
        chat(("human", "emoji " * 50), ("bot", "\U0001f468\u200d\U0001f469\u200d\U0001f467 " * 40)),
        {"chat_rounds": [{"role": "human", "content": "Keys?", "chat_round_id": 1, "meta": {"a": [1, None]}},
                         {"role": "bot", "content": "Extra keys are ignored.", "score": 1.5}], "id": "x", "n": None},
    ]


# ---------------------------------------------------------------------------------------------- mutations

Mutation = Callable[[random.Random, dict], bytes]


def _as_chat(record: dict) -> dict:
    """A deep copy in chat_rounds form (prompt/answer records are converted)."""
    record = json.loads(json.dumps(record))
    if "chat_rounds" not in record:
        turns = [("system", record.get("system")), ("human", record.get("prompt")), ("bot", record.get("answer"))]
        record = {"chat_rounds": [{"role": r, "content": c} for r, c in turns if c is not None]}
    return record


def _encode(rng: random.Random, record: object) -> bytes:
    return dumps(record, ascii_only=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def _turn(rng: random.Random, record: dict) -> dict:
    return rng.choice(record["chat_rounds"])


def _pos(rng: random.Random, data: bytes | str) -> int:
    return rng.randint(0, len(data))


def _insert_text(rng: random.Random, text: str, piece: str) -> str:
    at = _pos(rng, text)
    return text[:at] + piece + text[at:]


def _raw_mutation(edit: Callable[[random.Random, bytes], bytes]) -> Mutation:
    """A mutation of the encoded line's bytes."""
    return lambda rng, record: edit(rng, _encode(rng, record))


def _flip(rng: random.Random, raw: bytes) -> bytes:
    """One to four bits flipped."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def _insert_bytes(rng: random.Random, raw: bytes) -> bytes:
    """Random bytes (any of 0-255, a newline too) inserted at one to four places."""
    for _ in range(rng.randint(1, 4)):
        at = _pos(rng, raw)
        raw = raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))) + raw[at:]
    return raw


def _delete_bytes(rng: random.Random, raw: bytes) -> bytes:
    """One to sixteen bytes deleted (inside a string the record may stay valid)."""
    start = rng.randrange(len(raw))
    return raw[:start] + raw[start + rng.randint(1, 16):]


def _truncate(rng: random.Random, raw: bytes) -> bytes:
    """Cut at a random byte, possibly inside a multi-byte character."""
    return raw[:rng.randrange(len(raw))]


def _invalid_utf8(rng: random.Random, raw: bytes) -> bytes:
    """Stray, truncated, overlong, surrogate-encoding or out-of-range UTF-8 sequences."""
    bad = rng.choice([b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\xaf",
                      b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xbf\xbf"])
    at = _pos(rng, raw)
    return raw[:at] + bad + raw[at:]


def _bom(rng: random.Random, raw: bytes) -> bytes:
    """A UTF-8 BOM at the start (dropped on a file's first line only), before a value, or anywhere."""
    at = rng.choice([0, 0, _pos(rng, raw), raw.index(b":") + 1])
    return raw[:at] + b"\xef\xbb\xbf" * rng.randint(1, 2) + raw[at:]


def _nul(rng: random.Random, raw: bytes) -> bytes:
    """Raw NUL bytes (a JSON string may hold only the escape \\u0000)."""
    at = rng.choice([0, len(raw), _pos(rng, raw)])
    return raw[:at] + b"\x00" * rng.randint(1, 3) + raw[at:]


def _line_endings(rng: random.Random, raw: bytes) -> bytes:
    """CRs and CRLFs: at the end (stripped), between tokens (JSON whitespace), or raw inside a string."""
    choice = rng.randrange(4)
    if choice == 0:
        return raw + rng.choice([b"\r", b"\r\r", b" \r", b"\r \r"])
    if choice == 1:
        return raw.replace(b", ", b",\r ").replace(b": ", b":\r\n\t" if rng.random() < 0.2 else b": \r")
    if choice == 2:
        return raw.replace(b"\\n", rng.choice([b"\r", b"\r\n", b"\\r\\n"]))
    return b"\r" + raw


def _split_line(rng: random.Random, raw: bytes) -> bytes:
    """A raw newline inside the record: it becomes two physical lines (both bad, or one empty)."""
    at = rng.choice([_pos(rng, raw), len(raw), 0])
    return raw[:at] + b"\n" + raw[at:]


def _escape(rng: random.Random, record: dict) -> bytes:
    """A JSON escape written into a content or role (lone or paired surrogates, NUL, invalid escapes)."""
    record = _as_chat(record)
    turn = _turn(rng, record)
    key = rng.choice(["content", "content", "content", "role"])
    text = turn[key] if isinstance(turn.get(key), str) else ""
    at = _pos(rng, text)
    escapes = "".join(rng.choice(ESCAPES) for _ in range(rng.randint(1, 2)))
    turn[key] = Raw(json.dumps(text[:at])[:-1] + escapes + json.dumps(text[at:])[1:])
    if rng.random() < 0.2:  # an escape in an extra field, and a lone surrogate in a key
        record["extra"] = Raw(f'"{rng.choice(ESCAPES)}"')
        record[f"key\ud800{rng.randrange(9)}"] = 1
    return _encode(rng, record)


def _long_string(rng: random.Random, record: dict, limit: int = 200_000) -> bytes:
    """A content, role or key of up to `limit` characters."""
    record = _as_chat(record)
    size = rng.choice([1_000, 10_000, 50_000, limit])
    alphabet = rng.choice(["ab ", "def f(x):\n    return x\n", "\U0001f600\u200b", "\u4e2d\u6587", " ", "\n",
                           "<|endoftext|>", "\\", "\x00"])
    text = (alphabet * (size // len(alphabet) + 1))[:size]
    target = rng.choice(["content", "content", "role", "key"])
    if target == "key":
        record[text] = 1
    else:
        _turn(rng, record)[target] = text
    return _encode(rng, record)


def _deep(rng: random.Random, record: dict) -> bytes:
    """Lists or objects nested 10 to 100,000 deep, as an extra field, the chat_rounds or a content."""
    depth = rng.choice([10, 100, 900, 990, 1000, 2000, 5000, 100_000])
    inner = rng.choice(['"x"', '"\\ud800"', "1", "null", "{}", '"<|endoftext|>"'])
    if rng.random() < 0.5:
        nested = "[" * depth + inner + "]" * depth
    else:
        nested = '{"a": ' * depth + inner + "}" * depth
    record = _as_chat(record)
    where = rng.randrange(3)
    if where == 0:
        record["extra"] = Raw(nested)
    elif where == 1:
        record["chat_rounds"] = Raw(nested)
    else:
        _turn(rng, record)["content"] = Raw(nested)
    return _encode(rng, record)


def _wrong_type(rng: random.Random, record: dict) -> bytes:
    """A value (or the whole line) replaced by another JSON type: null, numbers, 1e400, NaN, huge ints, ..."""
    record = _as_chat(record)
    value = Raw(rng.choice(WRONG_VALUES))
    where = rng.randrange(6)
    if where == 0:
        record["chat_rounds"] = value
    elif where == 1:
        rounds = record["chat_rounds"]
        rounds[rng.randrange(len(rounds))] = value
    elif where in (2, 3):
        _turn(rng, record)["content" if where == 2 else "role"] = value
    elif where == 4:
        pa = _to_prompt_answer(record)
        pa[rng.choice(["prompt", "answer", "system"])] = value
        record = pa
    else:
        record = value  # the whole line
    return _encode(rng, record)


def _duplicate_keys(rng: random.Random, record: dict) -> bytes:
    """A key written twice (the last one wins), at the top level or in a turn."""
    record = _as_chat(record)
    if rng.random() < 0.5:
        other = rng.choice([Raw("null"), [], [{"role": "human", "content": "dup"}, {"role": "bot", "content": "dup"}]])
        items = list(record.items()) + [("chat_rounds", other)]
        return _encode(rng, Pairs(items if rng.random() < 0.5 else items[::-1]))
    rounds = record["chat_rounds"]
    i = rng.randrange(len(rounds))
    key = rng.choice(["role", "content"])
    dup = rng.choice(["bot", "human", "system", "", None, 3, "again"])
    rounds[i] = Pairs(list(rounds[i].items()) + [(key, dup)])
    return _encode(rng, record)


def _unknown_role(rng: random.Random, record: dict) -> bytes:
    """A role that is not system/human/bot/user/assistant: typos, other APIs' names, control characters."""
    record = _as_chat(record)
    _turn(rng, record)["role"] = rng.choice(ODD_ROLES)
    return _encode(rng, record)


def _role_case(rng: random.Random, record: dict) -> bytes:
    """A known role in other letter case (roles are case-sensitive)."""
    record = _as_chat(record)
    turn = _turn(rng, record)
    turn["role"] = rng.choice([str.upper, str.title, str.swapcase, lambda s: s[0].upper() + s[1:]])(turn["role"])
    return _encode(rng, record)


def _blank_content(rng: random.Random, record: dict) -> bytes:
    """Empty, whitespace-only, or nearly blank (zero-width) contents; prompt/answer too."""
    record = _as_chat(record)
    blank = rng.choice(BLANKS) * rng.randint(1, 3)
    if rng.random() < 0.25:
        record = _to_prompt_answer(record)
        record[rng.choice(["prompt", "answer", "system"])] = blank
    else:
        _turn(rng, record)["content"] = blank
    return _encode(rng, record)


def _control_tokens(rng: random.Random, record: dict) -> bytes:
    """Control-token text of the templates inside contents (trained as text, or refused where it cannot be)."""
    return _insert_into_contents(rng, record, CONTROL_TEXT, most=3)


def _exotic_text(rng: random.Random, record: dict) -> bytes:
    """Zero-width, bidi-control, emoji, combining, private-use and control characters inside contents."""
    return _insert_into_contents(rng, record, EXOTIC_TEXT, most=4)


def _insert_into_contents(rng: random.Random, record: dict, texts, most: int) -> bytes:
    """1..most of `texts`, each inserted into a random turn's content."""
    record = _as_chat(record)
    for _ in range(rng.randint(1, most)):
        turn = _turn(rng, record)
        turn["content"] = _insert_text(rng, turn["content"], rng.choice(texts))
    return _encode(rng, record)


def _extra_keys(rng: random.Random, record: dict) -> bytes:
    """Unknown keys (ignored) at the top level or in a turn, some close to real ones."""
    record = _as_chat(record)
    value = rng.choice([None, 1, "x", [1, 2], {"nested": True}, Raw("NaN"), Raw("1e400"), "\u202e"])
    key = rng.choice(["id", "meta", "", " ", "chat_round", "Chat_Rounds", "prompt_", "\u200b", "system", "answer"])
    if rng.random() < 0.5:
        record[key] = value
    else:
        _turn(rng, record)[key] = value
    return _encode(rng, record)


def _to_prompt_answer(record: dict) -> dict:
    """prompt/answer form from the first human and bot turns (and the system turn)."""
    rounds = [t for t in record.get("chat_rounds", []) if isinstance(t, dict)]
    first = {t.get("role"): t.get("content") for t in reversed(rounds)}
    out = {"prompt": first.get("human", first.get("user", "q")), "answer": first.get("bot", first.get("assistant", "a"))}
    if "system" in first:
        out["system"] = first["system"]
    return out


def _prompt_answer(rng: random.Random, record: dict) -> bytes:
    """chat_rounds swapped to prompt/answer form, sometimes with parts missing or both forms present."""
    chat = _as_chat(record)
    pa = _to_prompt_answer(chat)
    choice = rng.randrange(5)
    if choice == 1:
        del pa[rng.choice(["prompt", "answer"])]
    elif choice == 2:
        pa = {**pa, "chat_rounds": chat["chat_rounds"]}  # both forms: a bad record
    elif choice == 3:
        pa["system"] = rng.choice([None, "", "Be brief.", 0])
    elif choice == 4:
        pa = {"question": pa["prompt"], "response": pa["answer"]}
    return _encode(rng, pa)


def _huge_record(rng: random.Random, record: dict) -> bytes:
    """A content of 0.5 to 2 MB (far beyond any seq_length here: cut before tokenizing, truncated or dropped)."""
    record = _as_chat(record)
    text = rng.choice(["ab ", "def f(x):\n    return x\n", "\u4e2d\u6587", "-"])
    _turn(rng, record)["content"] = text * (rng.randint(500_000, 2_000_000) // len(text))
    return _encode(rng, record)


def _remove_key(rng: random.Random, record: dict) -> bytes:
    """chat_rounds, or a turn's role or content, removed."""
    record = _as_chat(record)
    if rng.random() < 0.3:
        record.pop("chat_rounds")
    else:
        _turn(rng, record).pop(rng.choice(["role", "content"]))
    return _encode(rng, record)


def _reorder(rng: random.Random, record: dict) -> bytes:
    """Turns dropped, duplicated, swapped or reversed; a system turn moved to the end."""
    record = _as_chat(record)
    rounds = record["chat_rounds"]
    choice = rng.randrange(5)
    i, j = rng.randrange(len(rounds)), rng.randrange(len(rounds))
    if choice == 0:
        rounds.pop(i)
    elif choice == 1:
        rounds.insert(i, dict(rounds[i]))
    elif choice == 2:
        rounds[i], rounds[j] = rounds[j], rounds[i]
    elif choice == 3:
        rounds.reverse()
    else:
        rounds.append({"role": "system", "content": "late system"})
    return _encode(rng, record)


def _not_object(rng: random.Random, record: dict) -> bytes:
    """Not one JSON object: a list, two records on a line, a string, a number, a comment, a stray comma."""
    raw = _encode(rng, record)
    return rng.choice([b"[" + raw + b"]", raw + b" " + raw, raw + raw, b'"' + raw.replace(b'"', b"'") + b'"',
                       b"null", b"42", b"[]", b"{}", b"  ", b"\t", b"{", b"}", b"//" + raw, raw + b",", b"\x0c" + raw])


def _whitespace_json(rng: random.Random, record: dict) -> bytes:
    """Whitespace around the JSON: JSON's own (spaces, tabs) or not (form feed, NBSP, a vertical tab)."""
    pad = rng.choice([" ", "\t", "  \t", "\x0c", "\x0b", "\u00a0", "\u3000", "\x1f"]).encode()
    raw = _encode(rng, record)
    return rng.choice([pad + raw, raw + pad, pad + raw + pad])


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": _raw_mutation(_flip),
    "insert_bytes": _raw_mutation(_insert_bytes),
    "delete_bytes": _raw_mutation(_delete_bytes),
    "truncate": _raw_mutation(_truncate),
    "invalid_utf8": _raw_mutation(_invalid_utf8),
    "bom": _raw_mutation(_bom),
    "nul_bytes": _raw_mutation(_nul),
    "cr_crlf": _raw_mutation(_line_endings),
    "split_line": _raw_mutation(_split_line),
    "json_escape": _escape,
    "long_string": _long_string,
    "deep_nesting": _deep,
    "wrong_type": _wrong_type,
    "duplicate_keys": _duplicate_keys,
    "unknown_role": _unknown_role,
    "role_case": _role_case,
    "blank_content": _blank_content,
    "control_tokens": _control_tokens,
    "exotic_text": _exotic_text,
    "extra_keys": _extra_keys,
    "prompt_answer": _prompt_answer,
    "huge_record": _huge_record,
    "remove_key": _remove_key,
    "reorder_turns": _reorder,
    "not_an_object": _not_object,
    "whitespace": _whitespace_json,
}


def mutate(rng: random.Random, record: dict, kind: str) -> bytes:
    """One mutated line; "stacked" applies a structural mutation and then one to two byte-level ones."""
    if kind != "stacked":
        return MUTATIONS[kind](rng, record)
    raw = MUTATIONS[rng.choice(STRUCTURAL)](rng, record)
    for _ in range(rng.randint(1, 2)):
        raw = rng.choice([_flip, _insert_bytes, _delete_bytes, _invalid_utf8, _nul, _line_endings])(rng, raw or b" ")
    return raw


STRUCTURAL = [k for k in MUTATIONS if k not in ("flip_bits", "insert_bytes", "delete_bytes", "truncate",
                                                "invalid_utf8", "bom", "nul_bytes", "cr_crlf", "split_line")]
KINDS = [*MUTATIONS, "stacked"]


# ---------------------------------------------------------------------------------------------- the oracle

# Text a message may not hold, per preset, with the shipped tokenizer: its role markers are added tokens that
# are not special, so the tokenizer always makes the marker from these characters and tokenize.py refuses the
# record ("cannot be kept as text"). Under the other presets they are not control tokens, only text.
REFUSED_IN_MESSAGES = {"mftcoder": ("<|role_start|>", "<|role_end|>")}


def expected_bad(raw: bytes, line_number: int, refused: tuple[str, ...] = ()) -> bool:
    """Whether one physical line (without its newline) is a bad record, by the README's rules: UTF-8 (a BOM
    is dropped on a file's first line), one JSON object, no lone surrogate anywhere, `chat_rounds` (a
    non-empty list of {role, content}) or a prompt/answer pair, known roles, non-blank string contents, an
    optional system turn first, then human/bot alternating and ending with a bot turn; and no message holds
    text of `refused` (see REFUSED_IN_MESSAGES)."""
    if len(raw) > MAX_RECORD_BYTES:
        return True
    if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
        obj = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError and too many digits are ValueErrors
        return True
    if not isinstance(obj, dict) or _has_lone_surrogate(obj):
        return True
    if "chat_rounds" in obj and ("prompt" in obj or "answer" in obj):  # both forms: refused, not resolved
        return True
    if "chat_rounds" in obj:
        rounds = obj["chat_rounds"]
        if not isinstance(rounds, list) or not rounds:
            return True
        turns, texts = [], []
        for item in rounds:
            if not (isinstance(item, dict) and isinstance(item.get("role"), str) and item["role"] in ROLES
                    and "content" in item and _is_text(item["content"])):
                return True
            turns.append(ROLES[item["role"]])
            texts.append(item["content"])
    elif "prompt" in obj or "answer" in obj:
        if any(not _is_text(obj.get(key)) for key in ("prompt", "answer")):
            return True
        if obj.get("system") is not None and not _is_text(obj["system"]):
            return True
        turns = (["system"] if obj.get("system") is not None else []) + ["human", "bot"]
        texts = [obj[key] for key in ("system", "prompt", "answer") if obj.get(key) is not None]
    else:
        return True
    body = turns[1:] if turns[0] == "system" else turns
    if not body or body != ["human", "bot"] * (len(body) // 2):
        return True
    return any(marker in text for marker in refused for text in texts)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _has_lone_surrogate(value: object) -> bool:
    """Any string (key or value) in a parsed JSON value that holds a surrogate; iterative, for deep values."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= c <= "\udfff" for c in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# ---------------------------------------------------------------------------------------------- one batch

@dataclass
class Entry:
    """One written record: its bytes (a raw newline inside makes several physical lines) and where it came from."""

    raw: bytes
    kind: str  # "good" or the mutation's name
    source: int  # index of the seed record


@dataclass
class FileCase:
    """A JSONL file of a batch: its entries and, after writing, its physical lines with their origin."""

    path: Path
    entries: list[Entry]
    trailing_newline: bool = True
    lines: list[bytes] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)  # physical line i (0-based) came from entries[origin[i]]

    def write(self) -> None:
        """Write the file; its physical lines are what a binary readline gives (an empty file: one bad line)."""
        self.lines = [piece for entry in self.entries for piece in entry.raw.split(b"\n")]
        self.origin = [i for i, entry in enumerate(self.entries) for _ in range(entry.raw.count(b"\n") + 1)]
        data = b"\n".join(self.lines)
        if self.trailing_newline and self.lines:
            data += b"\n"
        elif len(self.lines) > 1 and self.lines[-1] == b"":  # the data ends with the newline before it
            self.lines, self.origin = self.lines[:-1], self.origin[:-1]
        if not data:
            self.lines, self.origin = [b""], [-1]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(data)

    def expected_bad_lines(self, refused: tuple[str, ...] = ()) -> set[int]:
        return {n for n, raw in enumerate(self.lines, 1) if expected_bad(raw, n, refused)}


@dataclass
class Batch:
    """Task folders of JSONL files plus the check's settings: one `mftcoder data check` run."""

    root: Path
    tasks: dict[str, list[FileCase]]
    policy: str
    seq_length: int
    preset: str
    skipped: list[str] = field(default_factory=list)  # entries under the task folders that must be reported skipped

    @property
    def files(self) -> list[FileCase]:
        return [f for files in self.tasks.values() for f in files]

    @property
    def mutations(self) -> int:
        return sum(e.kind != "good" for f in self.files for e in f.entries)

    def argv(self) -> list[str]:
        folders = [str(self.root / name) for name in self.tasks]
        return ["data", "check", "/dev/null", f"data_paths={json.dumps(folders)}",
                f"data_cache_dir={self.root / 'cache'}", f"on_bad_record={self.policy}",
                f"seq_length={self.seq_length}", f"chat_template={self.preset}", "preprocessing_num_workers=1"]


def make_batch(rng: random.Random, root: Path, seeds: list[dict], mutations: int,
               kinds: Iterable[str]) -> Batch:
    """`mutations` mutated lines (kinds taken in turn from `kinds`) mixed with half to twice as many good ones,
    spread over one to three task folders of one to three files each; written to disk."""
    kinds = iter(kinds)
    files: list[FileCase] = []
    names = [f"task{k}" for k in range(rng.randint(1, 3))]
    for name in names:
        for j in range(rng.randint(1, 3)):
            sub = rng.choice(["", "", "sub/"])
            files.append(FileCase(root / name / f"{sub}part{j}.jsonl", []))
    for _ in range(mutations):
        source = rng.randrange(len(seeds))
        rng.choice(files).entries.append(Entry(mutate(rng, seeds[source], kind := next(kinds)), kind, source))
    for case in files:
        for _ in range(rng.randint(len(case.entries) // 2, 2 * len(case.entries) + 1)):
            source = rng.randrange(len(seeds))
            case.entries.insert(_pos(rng, case.entries), Entry(_encode(rng, seeds[source]), "good", source))
        case.trailing_newline = rng.random() < 0.9
        case.write()
    tasks = {name: [f for f in files if f.path.relative_to(root).parts[0] == name] for name in names}
    return Batch(root, tasks, rng.choice(["skip", "error"]), rng.choice([32, 128, 512, 2048, 8192]),
                 rng.choice(["mftcoder", "mftcoder", "codefuse", "chatml"]))


def add_unreadable_entries(rng: random.Random, batch: Batch) -> None:
    """A FIFO, a broken symlink and a symlink loop in random task folders: each must be reported as skipped,
    never opened (a FIFO would block) and never followed forever."""
    names = list(batch.tasks)
    fifo = batch.root / rng.choice(names) / "pipe.jsonl"
    os.mkfifo(fifo)
    broken = batch.root / rng.choice(names) / "gone.jsonl"
    os.symlink(batch.root / "nowhere.jsonl", broken)
    loop = batch.root / rng.choice(names) / "loop"
    os.symlink(".", loop)
    batch.skipped += [str(fifo), str(broken), str(loop)]


def kind_cycle(rng: random.Random) -> Iterable[str]:
    """Every mutation kind once, in a shuffled order, again and again: a few hundred mutations cover them all."""
    while True:
        order = list(KINDS)
        rng.shuffle(order)
        yield from order


# ---------------------------------------------------------------------------------------------- judging a run

ERROR_LINE = re.compile(r"^(?P<path>/.+?\.jsonl):(?P<line>\d+): (?P<reason>.+)$")
SUMMARY = re.compile(r"^(?P<count>\d+) bad record\(s\) \((stopping|skipped and counted): on_bad_record=\w+\)$")
SKIP_LINE = re.compile(r"^(?P<path>/[^:]+): (?P<reason>.+); (skipped|not read, skipped|read once, skipped here)$")
SKIP_SUMMARY = re.compile(r"^(?P<count>\d+) entry\(ies\) under the task folders not read as data \(.+\)$")


@dataclass
class Outcome:
    """What one run showed: the reported bad lines, the table's rows, and every problem found."""

    bad_reported: int = 0
    table: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    offending: list[tuple[str, int]] = field(default_factory=list)  # (file, line) to keep for reproduction
    crashed: bool = False  # a traceback or an exit code other than 0 and 1


def judge(batch: Batch, code: int | None, out: str, err: str) -> Outcome:
    """Compare a run's exit code and output with what the oracle expects of the batch."""
    result = Outcome()
    problems = result.problems
    if "Traceback" in out + err or code not in (0, 1):
        result.crashed = True
        text = err if "Traceback" in err else out if "Traceback" in out else err[-3000:]
        problems.append(f"exit code {code}: a crash:\n" + text[text.find("Traceback"):][-3000:])
        return result  # what it printed before the crash says nothing about the lines
    refused = REFUSED_IN_MESSAGES.get(batch.preset, ())
    expected = {str(f.path): f.expected_bad_lines(refused) for f in batch.files}
    physical = {str(f.path): max(len(f.lines), 1) for f in batch.files}
    reported: dict[str, set[int]] = {path: set() for path in expected}
    other: list[str] = []
    summary_count = skip_count = None
    skipped_reported: list[str] = []
    for row in out.splitlines():
        match = ERROR_LINE.match(row)
        if (skip := SKIP_LINE.match(row)) is not None:
            skipped_reported.append(skip["path"])
            continue
        if (skip_summary := SKIP_SUMMARY.match(row)) is not None:
            skip_count = int(skip_summary["count"])
            continue
        if match and match["path"] in reported:
            number = int(match["line"])
            if not 1 <= number <= physical[match["path"]]:
                problems.append(f"reported line {number} does not exist in {match['path']}: {row[:300]}")
            elif number in reported[match["path"]]:
                problems.append(f"line reported twice: {row[:300]}")
            reported[match["path"]].add(number)
            result.bad_reported += 1
        elif (summary := SUMMARY.match(row)) is not None:
            summary_count = int(summary["count"])
        else:
            other.append(row)
    table_rows = _parse_table(other, batch, problems)
    result.table = table_rows
    for path, lines in expected.items():
        for number in sorted(lines ^ reported[path]):
            what = "not reported, though bad" if number in lines else "reported bad, though the oracle finds it good"
            problems.append(f"{path}:{number}: {what}")
            result.offending.append((path, number))
    total_bad = sum(len(v) for v in expected.values())
    if summary_count != (total_bad or None):
        problems.append(f"summary says {summary_count} bad record(s), expected {total_bad}")
    if sorted(skipped_reported) != sorted(batch.skipped) or skip_count != (len(batch.skipped) or None):
        problems.append(f"skipped entries reported {sorted(skipped_reported)} (count {skip_count}), "
                        f"expected {sorted(batch.skipped)}")
    want_code = 1 if batch.policy == "error" and (total_bad or batch.skipped) else 0
    if code != want_code:
        problems.append(f"exit code {code}, expected {want_code} (policy {batch.policy}, {total_bad} bad)")
    for name, files in batch.tasks.items():
        row = table_rows.get(name)
        if row is None:
            continue
        lines = sum(max(len(f.lines), 1) for f in files)
        bad = sum(len(expected[str(f.path)]) for f in files)
        n_lines, n_bad, kept, truncated, dropped, supervised = map(int, row[1:7])
        if (n_lines, n_bad) != (lines, bad) or kept + dropped != lines - bad or truncated > kept or supervised < kept:
            problems.append(f"task {name}: table row {row} does not add up (lines {lines}, bad {bad})")
    return result


def _parse_table(rows: list[str], batch: Batch, problems: list[str]) -> dict[str, list[str]]:
    """The report table's task rows; any output line that is neither the table nor its notes is a problem."""
    table: dict[str, list[str]] = {}
    for row in rows:
        fields = row.split()
        if row.startswith("task ") and "supervised" in row:
            continue
        if fields and fields[0] in batch.tasks and len(fields) == 12:
            table[fields[0]] = fields
        elif fields and fields[0] == "all" and len(batch.tasks) > 1:
            continue
        elif row.startswith("tokenized data: ") or row.startswith("ctl-as-text: "):
            continue
        else:
            problems.append(f"unexpected output line (a reason spread over lines?): {row[:300]!r}")
    missing = set(batch.tasks) - set(table)
    if missing:
        problems.append(f"no table row for task(s) {sorted(missing)}")
    return table


def save_failure(batch: Batch, outcome: Outcome, out_dir: Path, command: list[str], out: str, err: str) -> Path:
    """Keep the batch's folders, the command (rerun it as is), its output and the offending lines (or, for a crash
    no single line reproduces, every mutated line), with where each came from."""
    target = out_dir / "failures" / batch.root.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(batch.root, target, ignore=shutil.ignore_patterns("cache"))
    (target / "command.txt").write_text(shlex.join(command).replace(str(batch.root), str(target)) + "\n")
    (target / "stdout.txt").write_text(out)
    (target / "stderr.txt").write_text(err)
    (target / "problems.txt").write_text("\n".join(outcome.problems) + "\n")
    by_path = {str(f.path): f for f in batch.files}
    picked = locate_crash(batch) if outcome.crashed else [(by_path[p], n) for p, n in outcome.offending]
    if not picked:  # a crash no single line reproduces: keep every mutated line
        picked = [(f, n) for f in batch.files for n, i in enumerate(f.origin, 1) if f.entries[i].kind != "good"]
    with open(target / "offending.jsonl", "wb") as lines_out, open(target / "offending-index.txt", "w") as index:
        for case, number in picked:
            index_ = case.origin[number - 1]
            entry = case.entries[index_] if index_ >= 0 else Entry(b"", "empty file", -1)
            lines_out.write(case.lines[number - 1] + b"\n")
            index.write(f"{target / case.path.relative_to(batch.root)}:{number}: {entry.kind} (seed record {entry.source})\n")
    return target


def locate_crash(batch: Batch) -> list[tuple[FileCase, int]]:
    """The lines that raise anything but BadRecord when read, validated and tokenized one at a time, in this
    process, the way `data check` does it."""
    from mftcoder.config import build_config
    from mftcoder.data.records import read_lines
    from mftcoder.data.tokenize import ChunkEncoder
    from mftcoder.model import load_tokenizer

    encoder = ChunkEncoder(*load_tokenizer(build_config({"chat_template": batch.preset})[0]))
    found = []
    for case in batch.files:
        try:
            for number, text in read_lines(case.path):
                try:
                    encoder((str(case.path), [(number, text)]))
                except Exception:  # noqa: BLE001 - any exception here is what we look for
                    found.append((case, number))
        except Exception:  # noqa: BLE001 - reading itself failed past this point
            found.append((case, len(found) + 1))
    return found


# ---------------------------------------------------------------------------------------------- the script

def run_subprocess(batch: Batch, timeout: float = 600) -> tuple[int | None, str, str, list[str]]:
    """The real CLI in its own process; exit code None when it did not finish in time."""
    command = [sys.executable, "-m", "mftcoder", *batch.argv()]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired as exc:
        return None, (exc.stdout or b"").decode(errors="replace"), "timed out", command
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"), command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=5000, help="mutated lines in all (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="work and failure folder (default: a temporary folder)")
    parser.add_argument("--per-run", type=int, default=300, help="mutated lines per CLI run (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep every batch's files, not only failed ones")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="mftcoder-fuzz-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    seeds = demo_records() + built_records()
    kinds = kind_cycle(rng)
    start = time.perf_counter()
    tried = files = reported = tracebacks = failed_runs = 0
    run = 0
    while tried < args.mutations:
        count = min(args.per_run, args.mutations - tried)
        root = out_dir / f"batch{run:04d}"
        shutil.rmtree(root, ignore_errors=True)
        batch = make_batch(rng, root, seeds, count, kinds)
        code, out, err, command = run_subprocess(batch)
        outcome = judge(batch, code, out, err)
        tried += batch.mutations
        files += len(batch.files)
        reported += outcome.bad_reported
        tracebacks += outcome.crashed
        if outcome.problems:
            failed_runs += 1
            where = save_failure(batch, outcome, out_dir, command, out, err)
            print(f"run {run}: {len(outcome.problems)} problem(s), kept in {where}:", file=sys.stderr)
            for problem in outcome.problems[:10]:
                print(f"  {problem if len(problem) < 2000 else problem[:300] + ' ... ' + problem[-1700:]}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        run += 1
        print(f"run {run}: {batch.mutations} mutations, {len(batch.files)} files, {outcome.bad_reported} bad, "
              f"exit {code}, {len(outcome.problems)} problem(s) [{time.perf_counter() - start:.0f}s]", flush=True)
    elapsed = time.perf_counter() - start
    print(f"mutations tried: {tried}, files: {files}, bad records reported: {reported}, tracebacks: {tracebacks}, "
          f"failed runs: {failed_runs} of {run}, time: {elapsed:.0f}s" + (f", failures in {out_dir / 'failures'}"
                                                                          if failed_runs else ""))
    if not args.out and not failed_runs and not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
