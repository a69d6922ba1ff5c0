"""Train-time ids equal the saved tokenizer's apply_chat_template ids, for every preset and the demo data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mftcoder.config import build_config
from mftcoder.data.records import Turn, parse_record
from mftcoder.data.tokenize import encode_conversations
from mftcoder.model import DEMO_DATA, load_tokenizer

HAND_WRITTEN = [
    (Turn("human", "Write quicksort."), Turn("bot", "def qs(xs):\n    return sorted(xs)\n")),
    (Turn("system", "You are terse."), Turn("human", "2+2?"), Turn("bot", "4"), Turn("human", "And 3+3?"),
     Turn("bot", "6"), Turn("human", "Tabs\tand \"quotes\" {{ }} {% raw %}"), Turn("bot", "ünïcödé ✓ 🚀 'ok'")),
    (Turn("human", '"""docstring first"""'), Turn("bot", '"""docstring answer"""\n\n\n')),
]


def saved_tokenizer(tmp_path, preset: str, markers=None):
    tokenizer, template = load_tokenizer(build_config({"chat_template": preset, "chat_markers": markers or {}})[0])
    tokenizer.save_pretrained(tmp_path / preset)
    return template, tokenizer, AutoTokenizer.from_pretrained(tmp_path / preset)


def as_messages(turns, aliases=False):
    names = {"human": "user", "bot": "assistant"} if aliases else {}
    return [{"role": names.get(t.role, t.role), "content": t.content} for t in turns]


@pytest.mark.parametrize("preset, markers", [
    ("mftcoder", None), ("codefuse", None), ("chatml", None),
    ("mftcoder", {"human": "### Q's \"question\"\n", "bot": "### Answer\\n:\n", "bot_end": "\n---\n"}),
])
def test_hand_written_conversations_round_trip(tmp_path, preset, markers):
    template, tokenizer, reloaded = saved_tokenizer(tmp_path, preset, markers)
    assert reloaded.chat_template == template.jinja()
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|endoftext|>", "<|padding|>")
    for turns in HAND_WRITTEN:
        (ids, mask), = encode_conversations(tokenizer, template, [turns])
        for aliases in (False, True):
            out = reloaded.apply_chat_template(as_messages(turns, aliases), return_assistant_tokens_mask=True)
            assert out["input_ids"] == ids.tolist()
            assert out["assistant_masks"] == mask.tolist()  # the Jinja {% generation %} span = our loss span
        text = reloaded.apply_chat_template(as_messages(turns), tokenize=False)
        assert text == template.render(turns).text


@pytest.mark.parametrize("preset", ["mftcoder", "codefuse"])
def test_generation_prompt_is_the_training_prefix(tmp_path, preset):
    template, tokenizer, reloaded = saved_tokenizer(tmp_path, preset)
    turns = HAND_WRITTEN[1]
    (train_ids, _), = encode_conversations(tokenizer, template, [turns])
    context = turns[:-1]
    prompt = reloaded.apply_chat_template(as_messages(context), add_generation_prompt=True, return_dict=False)
    (expected, mask), = encode_conversations(tokenizer, template, [context], add_generation_prompt=True)
    assert prompt == expected.tolist()
    assert train_ids[: len(prompt)].tolist() == prompt  # the model sees at inference what it saw in training
    assert tokenizer.decode(prompt).endswith(template.bot)


def test_demo_data_round_trips(tmp_path):
    template, tokenizer, reloaded = saved_tokenizer(tmp_path, "mftcoder")
    conversations = [parse_record(line) for path in sorted(DEMO_DATA.rglob("*.jsonl"))
                     for line in path.read_text().splitlines()]
    assert len(conversations) >= 600
    encoded = encode_conversations(tokenizer, template, conversations)
    expected = reloaded.apply_chat_template([as_messages(t) for t in conversations], return_dict=False)
    mismatches = [i for i, ((ids, _), want) in enumerate(zip(encoded, expected)) if ids.tolist() != want]
    assert mismatches == []
    with_prompt = reloaded.apply_chat_template([as_messages(t[:-1]) for t in conversations[:50]],
                                               add_generation_prompt=True, return_dict=False)
    for (ids, _), want in zip(encoded[:50], with_prompt):
        assert ids[: len(want)].tolist() == want
    assert sum(int(np.asarray(m).sum()) for _, m in encoded) > 50_000
