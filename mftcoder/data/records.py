"""Read and validate JSONL chat records; every problem becomes `file:line: reason`."""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

ROLE_NAMES = {"system": "system", "human": "human", "bot": "bot", "user": "human", "assistant": "bot"}
MAX_RECORD_BYTES = 32 * 1024 * 1024
T = TypeVar("T")
SHOWN_ERRORS = 20  # read_jsonl lists this many bad lines, then counts the rest


def _shown(text: str, limit: int = 40) -> str:
    """Text from the data as a one-line reason shows it: quoted, with newlines, control and invisible characters
    escaped, cut after `limit` characters."""
    return repr(text[:limit]) + (f"... ({len(text):,} characters)" if len(text) > limit else "")


class DataError(Exception):
    """Data that cannot be used as given; the message says where and why."""


class BadRecord(ValueError):
    """One record that fails validation; the message is the reason (no location)."""


@dataclass(frozen=True)
class Turn:
    role: str  # canonical: system, human or bot
    content: str


def _turn(index: int, item: object) -> Turn:
    where = f"chat_rounds[{index}]"
    if not isinstance(item, dict):
        raise BadRecord(f"{where}: expected an object with 'role' and 'content', got {type(item).__name__}")
    for key in ("role", "content"):
        if key not in item:
            raise BadRecord(f"{where}: missing '{key}'")
    role, content = item["role"], item["content"]
    if not isinstance(role, str):
        raise BadRecord(f"{where}.role: expected a string, got {type(role).__name__}")
    if role not in ROLE_NAMES:
        match = difflib.get_close_matches(role, list(ROLE_NAMES), n=1)
        hint = f"; did you mean '{match[0]}'?" if match else ""
        raise BadRecord(f"{where}: unknown role {_shown(role)} (expected system, human, bot, user or assistant){hint}")
    if not isinstance(content, str):
        raise BadRecord(f"{where}.content: expected a string, got {type(content).__name__}")
    if not content.strip():
        raise BadRecord(f"{where}.content is empty")
    return Turn(ROLE_NAMES[role], content)


def _check_order(turns: list[Turn], prompt_only: bool = False) -> None:
    """Optional system first, then human and bot alternating, starting with human; a training record ends
    with a bot turn, a prompt (prompt_only) with the human turn to answer."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    offset = len(turns) - len(body)
    expected = "human"
    for i, turn in enumerate(body):
        if turn.role == "system":
            raise BadRecord(f"chat_rounds[{i + offset}]: 'system' is only allowed as the first turn")
        if turn.role != expected:
            raise BadRecord(f"chat_rounds[{i + offset}]: expected a {expected} turn, got {turn.role} "
                            "(turns must alternate human, bot, human, bot, ...)")
        expected = "bot" if expected == "human" else "human"
    if prompt_only:
        if not body or body[-1].role != "human":
            raise BadRecord("a prompt must end with a human turn (the one to answer)")
        return
    if not any(t.role == "bot" for t in body):
        raise BadRecord("no bot turn to learn from")
    if body[-1].role != "bot":
        raise BadRecord("the last turn is a human turn with no bot answer")


def parse_json_object(text: str) -> dict:
    """One JSONL line -> its JSON object, or BadRecord with the reason."""
    if not text.strip():
        raise BadRecord("empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if exc.msg.endswith(" at") else f"at column {exc.colno}"
        raise BadRecord(f"invalid JSON: {exc.msg} {where}") from None
    except RecursionError:
        raise BadRecord("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # not a syntax error: an integer longer than Python converts (4300 digits by default)
        raise BadRecord(f"invalid JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(obj)
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON may spell lone UTF-16 halves, UTF-8 cannot hold them


def _check_unicode(value: object) -> None:
    """BadRecord for the first string (key or value) holding a lone surrogate (a "\\ud800" escape without its
    low half). Iterative: a value nested as deeply as the JSON parser allows cannot exhaust the stack."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = where if len(where) <= 80 else f"{where[:50]}...{where[-25:]}"
                raise BadRecord(f"{where or 'a string'}: lone surrogate \\u{ord(item[exc.start]):04x} at character "
                                f"{exc.start} (half of a UTF-16 pair; not valid Unicode text)") from None
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                path = (f"{where}.{key}" if key.isidentifier() and len(key) <= 40 else f"{where}[{_shown(key)}]").lstrip(".")
                stack += [(child, path), (key, f"{path} (key)")]
        elif isinstance(item, list):
            stack += [(child, f"{where}[{i}]") for i, child in reversed(list(enumerate(item)))]


def parse_record(text: str) -> tuple[Turn, ...]:
    """One training JSONL line -> its turns, or BadRecord with the reason."""
    return record_turns(parse_json_object(text))


def record_turns(obj: dict, prompt_only: bool = False) -> tuple[Turn, ...]:
    """A record's turns from `chat_rounds` or a prompt/answer pair (prompt_only: the answer is not needed
    and a conversation must end with the human turn to answer)."""
    if "chat_rounds" in obj and ("prompt" in obj or "answer" in obj):
        both = "', '".join(k for k in ("prompt", "answer") if k in obj)
        raise BadRecord(f"both 'chat_rounds' and '{both}': a record is one or the other form; keep one")
    if "chat_rounds" in obj:
        rounds = obj["chat_rounds"]
        if not isinstance(rounds, list) or not rounds:
            raise BadRecord("'chat_rounds' must be a non-empty list")
        turns = [_turn(i, item) for i, item in enumerate(rounds)]
    elif "prompt" in obj or "answer" in obj:
        turns = []
        for key, role in (("system", "system"), ("prompt", "human"), ("answer", "bot")):
            if (key == "system" and obj.get("system") is None) or (key == "answer" and prompt_only):
                continue
            if key not in obj:
                raise BadRecord(f"missing '{key}' (a prompt/answer record needs both)")
            value = obj[key]
            if not isinstance(value, str):
                raise BadRecord(f"'{key}': expected a string, got {type(value).__name__}")
            if not value.strip():
                raise BadRecord(f"'{key}' is empty")
            turns.append(Turn(role, value))
    else:
        raise BadRecord("missing 'chat_rounds' (or a 'prompt'/'answer' pair)")
    _check_order(turns, prompt_only)
    return tuple(turns)


def read_jsonl(path: Path, convert: Callable[[dict, int], T], what: str = "record") -> list[T]:
    """convert(record, line number) for every line of a JSONL file; the bad lines are reported together as
    file:line: reason (convert raises BadRecord; the first 20, then a count), and then nothing is returned."""
    items, errors = [], []
    for number, text in read_lines(path):
        try:
            if isinstance(text, BadRecord):
                raise text
            items.append(convert(parse_json_object(text), number))
        except BadRecord as exc:
            errors.append(f"{path}:{number}: {exc}")
    if errors:
        shown = errors[:SHOWN_ERRORS] + ([f"... and {len(errors) - SHOWN_ERRORS} more"] if len(errors) > SHOWN_ERRORS else [])
        raise DataError("\n".join(shown) + f"\n{len(errors)} bad {what} record(s) in {path}")
    return items


def read_lines(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, str | BadRecord]]:
    """Yield (line number, decoded text or BadRecord) for each line; bounded memory for huge lines."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there since the folder was listed cannot block
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        yield 1, BadRecord("not a regular file (a FIFO, socket or device); not read")
        return
    with os.fdopen(fd, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                break
            number += 1
            if len(raw) > max_bytes:
                size = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                    size += len(raw)
                size -= raw.endswith(b"\n")
                yield number, BadRecord(f"line is {size:,} bytes, over the limit of {max_bytes:,}")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, BadRecord(f"not valid UTF-8: {exc.reason} (byte 0x{raw[exc.start]:02x} at offset {exc.start})")
        if number == 0:
            yield 1, BadRecord("file is empty")
