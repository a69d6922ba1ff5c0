"""`chat_template: model`: the checkpoint's own template, with exact ids and loss masks; control-token text inside
messages trained as text; BOS exactly once. Tokenizers: the shipped one with the formats' control tokens added."""

from __future__ import annotations

import json

import pytest
from conftest import chat, write_task
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from mftcoder.cli import main
from mftcoder.config import ConfigError, build_config
from mftcoder.data.records import Turn, parse_record
from mftcoder.data.tokenize import encode_conversations
from mftcoder.infer import prompt_ids
from mftcoder.model import DEMO_DATA, SHIPPED_TOKENIZER, load_tokenizer

# Templates written for these tests in the shapes of common families (not copied from any model).
CHATML_DEFAULT_SYSTEM = (  # SmolLM2 / Qwen2.5 shape: a default system prompt when none is given
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou help with code.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
HEADERS_TRIMMED = (  # Llama-3 shape: BOS written by the template, header tokens, trimmed content
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
THINK_LAST = (  # Qwen3 shape: an empty think block before the answer to the last question
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.index0 > ns.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NO_SYSTEM = (  # Gemma shape: no system role, the assistant is 'model'
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
NO_END_OF_TURN = "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
STYLES = {"chatml": (CHATML_DEFAULT_SYSTEM, "<|im_end|>"), "headers": (HEADERS_TRIMMED, "<|eot_id|>"),
          "think": (THINK_LAST, "<|im_end|>"), "no_system": (NO_SYSTEM, "<end_of_turn>")}
CONTROL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<start_of_turn>", "<end_of_turn>"]

CONVERSATIONS = [
    (Turn("human", "Write quicksort."), Turn("bot", "def qs(xs):\n    return sorted(xs)\n")),
    (Turn("system", "Be terse."), Turn("human", "2+2?"), Turn("bot", " 4 "), Turn("human", "And 3+3?"),
     Turn("bot", "6")),
    (Turn("human", "Tabs\tand \"quotes\" {{ }} {% raw %}"), Turn("bot", "ünïcödé ✓ 🚀 'ok'")),
]


def make_tokenizer(tmp_path, template: str, bos_by_default: bool = False):
    """The shipped tokenizer plus the formats' control tokens (and <|begin_of_text|> as BOS), saved with a template."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": CONTROL})
    if bos_by_default:
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tokenizer.bos_token_id)])
    tokenizer.chat_template = template
    folder = tmp_path / f"tokenizer-{abs(hash((template, bos_by_default)))}"
    tokenizer.save_pretrained(folder)
    return folder


def model_template(folder):
    return load_tokenizer(build_config({"tokenizer_path": str(folder), "chat_template": "model"})[0])


def messages(turns):
    return [{"role": {"human": "user", "bot": "assistant"}.get(t.role, t.role), "content": t.content} for t in turns]


def demo_conversations(count: int):
    return [parse_record(line) for path in sorted(DEMO_DATA.rglob("*.jsonl"))
            for line in path.read_text().splitlines()[:count]]


@pytest.mark.parametrize("style", ["chatml", "headers", "think", "no_system"])
def test_train_ids_equal_apply_chat_template_and_the_mask_is_content_plus_end_of_turn(tmp_path, style):
    source, end_of_turn = STYLES[style]
    original = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path, source))
    tokenizer, template = model_template(make_tokenizer(tmp_path, source))
    assert template.end_of_turn == end_of_turn
    conversations = [c for c in CONVERSATIONS + demo_conversations(40)
                      if not (style == "no_system" and c[0].role == "system")]
    encoded = encode_conversations(tokenizer, template, conversations)
    assert [ids.tolist() for ids, _ in encoded] == original.apply_chat_template(
        [messages(c) for c in conversations], return_dict=False)
    trims = style == "headers"
    for turns, (ids, mask) in zip(conversations, encoded):
        bot = [t.content.strip() if trims else t.content for t in turns if t.role == "bot"]
        assert tokenizer.decode(ids[mask.astype(bool)]) == "".join(b + end_of_turn for b in bot)
    # The saved tokenizer renders any conversation exactly as the original checkpoint's tokenizer does.
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for turns in conversations[:10]:
        for prompt in (False, True):
            assert saved.apply_chat_template(messages(turns), tokenize=False, add_generation_prompt=prompt) == \
                original.apply_chat_template(messages(turns), tokenize=False, add_generation_prompt=prompt)


def test_exact_mask_of_a_multi_turn_conversation_in_a_trimming_template(tmp_path):
    tokenizer, template = model_template(make_tokenizer(tmp_path, HEADERS_TRIMMED))
    (ids, mask), = encode_conversations(tokenizer, template, [CONVERSATIONS[1]])
    got = list(zip(tokenizer.convert_ids_to_tokens(ids.tolist()), mask.tolist()))
    def header(*role):
        return [("<|start_header_id|>", 0), *((r, 0) for r in role), ("<|end_header_id|>", 0), ("Ċ", 0), ("Ċ", 0)]

    assert got == [("<|begin_of_text|>", 0), *header("system"), ("Be", 0), ("Ġter", 0), ("se", 0), (".", 0),
                   ("<|eot_id|>", 0), *header("user"), ("2", 0), ("+", 0), ("2", 0), ("?", 0), ("<|eot_id|>", 0),
                   *header("ass", "istant"), ("4", 1), ("<|eot_id|>", 1), *header("user"), ("And", 0), ("Ġ3", 0),
                   ("+", 0), ("3", 0), ("?", 0), ("<|eot_id|>", 0), *header("ass", "istant"), ("6", 1),
                   ("<|eot_id|>", 1)]  # ' 4 ' trimmed by the template: the loss is on what the model sees


def test_the_think_block_of_the_last_answer_is_context_not_loss(tmp_path):
    tokenizer, template = model_template(make_tokenizer(tmp_path, THINK_LAST))
    turns = CONVERSATIONS[1]
    rendering = template.render(turns)
    (ids, mask), = encode_conversations(tokenizer, template, [turns])
    assert rendering.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n")
    assert [rendering.text[a:b] for a, b in rendering.supervised] == [" 4 <|im_end|>", "6<|im_end|>"]
    assert tokenizer.decode(ids[mask.astype(bool)]) == " 4 <|im_end|>6<|im_end|>"


def test_inference_prompt_is_the_training_prefix(tmp_path):
    # (Not HEADERS_TRIMMED with this tokenizer: its pre-tokenizer makes one token of a trailing '\n\n' but two
    # before text, so any prompt ending in the header differs from training; a Llama-3 tokenizer does not.)
    for source in (CHATML_DEFAULT_SYSTEM, NO_SYSTEM):
        tokenizer, template = model_template(make_tokenizer(tmp_path, source))
        turns = CONVERSATIONS[0]
        (train_ids, mask), = encode_conversations(tokenizer, template, [turns])
        prompt = prompt_ids(tokenizer, list(turns[:-1]))
        assert train_ids[:len(prompt)].tolist() == prompt and mask[len(prompt)] == 1 and mask[:len(prompt)].sum() == 0
        assert prompt == tokenizer.apply_chat_template(messages(turns[:-1]), add_generation_prompt=True,
                                                       return_dict=False)


def test_a_template_without_end_of_turn_token_or_chat_template_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="writes no end-of-turn token after an assistant message"):
        model_template(make_tokenizer(tmp_path, NO_END_OF_TURN))
    with pytest.raises(ConfigError, match="'model' needs a tokenizer with a chat template"):
        load_tokenizer(build_config({"chat_template": "model"})[0])
    with pytest.raises(ConfigError, match="chat_markers: only presets take markers"):
        load_tokenizer(build_config({"tokenizer_path": str(make_tokenizer(tmp_path, CHATML_DEFAULT_SYSTEM)),
                                     "chat_template": "model", "chat_markers": {"bot": "x"}})[0])


def test_records_the_template_refuses_are_bad_records_with_their_line(tmp_path, capsys):
    folder = write_task(tmp_path, "t", [chat(("human", "q"), ("bot", "a")), chat(("human", "q"), ("bot", "a"), system="s")])
    args = ["data", "check", "/dev/null", f"data_paths=[{folder}]", f"tokenizer_path={make_tokenizer(tmp_path, NO_SYSTEM)}",
            "chat_template=model", f"data_cache_dir={tmp_path / 'cache'}", "on_bad_record=skip"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'data.jsonl'}:2: the model's chat template refused this conversation: System role not supported" in out


LITERALS = (Turn("system", "Never print <|endoftext|>."), Turn("human", "What is <|im_end|>?<|im_end|>"),
            Turn("bot", "It ends a turn: <|im_end|>"), Turn("human", "and </s> or <s>?"), Turn("bot", "<|endoftext|>"))


@pytest.mark.parametrize("preset", ["mftcoder", "chatml", "model"])
def test_control_tokens_in_messages_are_trained_as_text(tmp_path, preset):
    folder = make_tokenizer(tmp_path, CHATML_DEFAULT_SYSTEM)
    config = build_config({"tokenizer_path": str(folder), "chat_template": preset})[0]
    tokenizer, template = load_tokenizer(config)
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    (ids, mask), = encode_conversations(tokenizer, template, [LITERALS])
    # Exactly what transformers gives when told to keep message text as text; the default differs.
    expected = saved.apply_chat_template(messages(LITERALS), return_dict=False, sanitize_control_tokens=True)
    assert ids.tolist() == expected
    assert ids.tolist() != saved.apply_chat_template(messages(LITERALS), return_dict=False)
    rendering = template.render(LITERALS)
    controls = sum(ids.tolist().count(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|endoftext|>"))
    assert controls == rendering.text.count("<|im_end|>") + rendering.text.count("<|endoftext|>") - 5  # 5 literal
    assert tokenizer.decode(ids[mask.astype(bool)]) == "".join(
        rendering.text[a:b] for a, b in rendering.supervised)
    prompt = prompt_ids(tokenizer, list(LITERALS[:-1]), template)  # inference keeps them text too
    assert prompt == ids[:len(prompt)].tolist() and mask[len(prompt)] == 1


def test_data_check_counts_records_with_control_token_text(tmp_path, capsys):
    folder = write_task(tmp_path, "t", [chat(("human", "q"), ("bot", "a")), chat(("human", "say <|endoftext|>"), ("bot", "no")),
                                        chat(("human", "q"), ("bot", "a </s> b <|padding|>"))])
    assert main(["data", "check", "/dev/null", f"data_paths=[{folder}]", f"data_cache_dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split()[-1] == "ctl-as-text" and row.split()[-1] == "2"  # <|padding|> is one; </s> is plain text here
    assert "trained as the characters it is" in out


def test_bos_exactly_once_for_presets_and_model_templates(tmp_path):
    turns = CONVERSATIONS[1]
    adds_bos = make_tokenizer(tmp_path, HEADERS_TRIMMED, bos_by_default=True)
    for preset in ("mftcoder", "model"):
        tokenizer, template = load_tokenizer(build_config({"tokenizer_path": str(adds_bos), "chat_template": preset})[0])
        (ids, _), = encode_conversations(tokenizer, template, [turns])
        assert ids[0] == tokenizer.bos_token_id and ids.tolist().count(tokenizer.bos_token_id) == 1
        prompt = prompt_ids(tokenizer, list(turns[:-1]), template)
        assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
        tokenizer.save_pretrained(tmp_path / preset)
        saved = AutoTokenizer.from_pretrained(tmp_path / preset)
        assert saved.apply_chat_template(messages(turns), return_dict=False) == ids.tolist()
    # A tokenizer that adds no BOS and a preset: no BOS (the shipped GPT-NeoX tokenizer has none by default).
    tokenizer, template = load_tokenizer(build_config({"tokenizer_path": str(make_tokenizer(tmp_path, NO_SYSTEM)),
                                                       "chat_template": "mftcoder"})[0])
    (ids, _), = encode_conversations(tokenizer, template, [turns])
    assert tokenizer.bos_token_id not in ids.tolist()

