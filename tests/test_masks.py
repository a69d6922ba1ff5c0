"""Exact loss masks, token by token, from the one-pass renderer + tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import chat, write_task

from mftcoder.config import build_config
from mftcoder.data.prepare import prepare_data
from mftcoder.data.records import Turn, parse_record
from mftcoder.data.tokenize import encode_conversations

RS, RE, EOS = "<|role_start|>", "<|role_end|>", "<|endoftext|>"


def tokens_and_mask(tokenizer, template, record: dict, seq_length: int | None = None):
    (ids, mask), = encode_conversations(tokenizer, template, [parse_record(json.dumps(record))])
    if seq_length:
        ids, mask = ids[:seq_length], mask[:seq_length]
    return list(zip(tokenizer.convert_ids_to_tokens(ids.tolist()), mask.tolist()))


def test_single_turn(tokenizer, template):
    got = tokens_and_mask(tokenizer, template, chat(("human", "Add one."), ("bot", "x + 1")))
    assert got == [
        (RS, 0), ("human", 0), (RE, 0), ("Add", 0), ("Ġone", 0), (".", 0),
        (RS, 0), ("bot", 0), (RE, 0), ("x", 1), ("Ġ+", 1), ("Ġ1", 1), (EOS, 1),
    ]


def test_multi_turn_with_system(tokenizer, template):
    record = chat(("human", "Add one."), ("bot", "x + 1"), ("human", "Why?"), ("bot", "It adds."), system="Be brief.")
    got = tokens_and_mask(tokenizer, template, record)
    assert got == [
        (RS, 0), ("system", 0), (RE, 0), ("Be", 0), ("Ġbrief", 0), (".", 0),
        (RS, 0), ("human", 0), (RE, 0), ("Add", 0), ("Ġone", 0), (".", 0),
        (RS, 0), ("bot", 0), (RE, 0), ("x", 1), ("Ġ+", 1), ("Ġ1", 1), (EOS, 1),
        (RS, 0), ("human", 0), (RE, 0), ("Why", 0), ("?", 0),
        (RS, 0), ("bot", 0), (RE, 0), ("It", 1), ("Ġadds", 1), (".", 1), (EOS, 1),
    ]
    ids = tokenizer.convert_tokens_to_ids([t for t, _ in got])
    assert ids[:3] == [50277, 10394, 50278] and ids[-1] == 0


def test_aliases_equal_canonical_roles(tokenizer, template):
    canonical = chat(("human", "Sort a list."), ("bot", "sorted(xs)"), ("human", "In place?"), ("bot", "xs.sort()"))
    aliased = chat(("user", "Sort a list."), ("assistant", "sorted(xs)"), ("user", "In place?"), ("assistant", "xs.sort()"))
    assert tokens_and_mask(tokenizer, template, aliased) == tokens_and_mask(tokenizer, template, canonical)
    assert sum(m for _, m in tokens_and_mask(tokenizer, template, aliased)) == 6 + 5  # s|orted|(|xs|)|EOS, xs|.|sort|()|EOS


def test_prompt_answer_pair(tokenizer, template):
    pair = {"prompt": "Add one.", "answer": "x + 1", "system": "Be brief."}
    assert tokens_and_mask(tokenizer, template, pair) == tokens_and_mask(
        tokenizer, template, chat(("human", "Add one."), ("bot", "x + 1"), system="Be brief."))


def test_mask_covers_whitespace_and_code_exactly(tokenizer, template):
    code = "def f(x):\n    return x  # done\n"
    got = tokens_and_mask(tokenizer, template, chat(("human", "  indent?\n"), ("bot", code)))
    supervised = [t for t, m in got if m]
    assert tokenizer.convert_tokens_to_string(supervised) == code + EOS
    assert tokenizer.convert_tokens_to_string([t for t, m in got if not m]).endswith(f"{RS}bot{RE}")


def test_truncation_into_last_bot_turn(tokenizer, template):
    record = chat(("human", "Add one."), ("bot", "x + 1"), ("human", "Why?"), ("bot", "It adds one to x."))
    full = tokens_and_mask(tokenizer, template, record)
    assert len(full) == 28 and full[-1] == (EOS, 1)
    got = tokens_and_mask(tokenizer, template, record, seq_length=25)  # cuts 'It adds one to x.' after 'to'
    assert got == full[:25]
    assert got[-5:] == [(RE, 0), ("It", 1), ("Ġadds", 1), ("Ġone", 1), ("Ġto", 1)]
    assert [m for _, m in got] == [0] * 9 + [1] * 4 + [0] * 8 + [1] * 4


def test_truncation_that_cuts_every_bot_turn_drops_and_counts(tmp_path, tokenizer, template):
    long_prompt = "word " * 40
    folder = write_task(tmp_path, "t", [
        chat(("human", long_prompt), ("bot", "answer")),  # bot turn beyond seq_length: dropped
        chat(("human", "short"), ("bot", "answer")),      # fits: kept
    ])
    config, _ = build_config({"data_paths": [str(folder)], "seq_length": 20, "data_split": "1,0,0",
                              "data_cache_dir": str(tmp_path / "cache")})
    task = prepare_data(config, tokenizer, template).per_task[0]
    assert task.kept.tolist() == [False, True]
    assert (task.dropped_no_target, task.truncated, task.dropped_over_length) == (1, 0, 0)
    assert sorted(task.train.tolist()) == [1]
    ids, mask = task.sample(1)
    assert mask.sum() == 2  # 'answer' + EOS


@pytest.mark.parametrize("policy, kept, counts", [("truncate", [True, True], (1, 0)), ("drop", [True, False], (0, 1))])
def test_over_length_policy(tmp_path, tokenizer, template, policy, kept, counts):
    folder = write_task(tmp_path, "t", [chat(("human", "hi"), ("bot", "short")),
                                        chat(("human", "hi"), ("bot", "long " * 30))])
    config, _ = build_config({"data_paths": [str(folder)], "seq_length": 16, "over_length": policy,
                              "data_split": "1,0,0", "data_cache_dir": str(tmp_path / "cache")})
    task = prepare_data(config, tokenizer, template).per_task[0]
    assert task.kept.tolist() == kept
    assert (task.truncated, task.dropped_over_length) == counts
    assert task.lengths.max() <= 16
    if policy == "truncate":
        ids, mask = task.sample(1)
        assert len(ids) == 16 and mask.tolist() == [0] * 7 + [1] * 9  # the bot turn starts at token 7


def test_records_parse_into_canonical_turns():
    assert parse_record(json.dumps(chat(("user", "q"), ("assistant", "a")))) == (Turn("human", "q"), Turn("bot", "a"))


def test_supervised_spans_with_plain_text_markers(tokenizer):
    """With markers the tokenizer does not split out, a token straddling the marker and the content counts
    (':"' here: the overlap rule of HF's assistant masks); the marker's other tokens and the prompt do not."""
    from mftcoder.data.template import build_template

    plain = build_template("mftcoder", {"bot": "<bot>:"}, tokenizer)
    (ids, mask), = encode_conversations(tokenizer, plain, [(Turn("human", "q"), Turn("bot", '"""x"""'))])
    assert list(zip(tokenizer.convert_ids_to_tokens(ids.tolist()), mask.tolist())) == [
        (RS, 0), ("human", 0), (RE, 0), ("q", 0), ("<", 0), ("bot", 0), (">", 0),
        (':"', 1), ('""', 1), ("x", 1), ('"""', 1), (EOS, 1)]
