"""The one renderer: a conversation -> its text, the character spans that carry loss and the spans of every
message's content. Presets (with their Jinja twin) or the model's own chat template (`chat_template: model`)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from mftcoder.config import ConfigError
from mftcoder.data.records import BadRecord, Turn

ROLES = ("system", "human", "bot")
HF_ROLES = {"system": "system", "human": "user", "bot": "assistant"}
Span = tuple[int, int]


@dataclass(frozen=True)
class Rendering:
    """A rendered conversation. `supervised`: each bot turn's content and end-of-turn token (the loss);
    `contents`: every message's content, where a literal control token is text, not a control token."""

    text: str
    supervised: tuple[Span, ...]
    contents: tuple[Span, ...]


@dataclass(frozen=True)
class ChatTemplate:
    """A preset. A turn renders as {prefix}{content}{role end}; a bot turn as {bot}{content}{eos}{bot_end};
    `bos` (set when the tokenizer adds one by default) starts every conversation. Loss: bot content + EOS."""

    name: str
    system: str
    human: str
    bot: str
    system_end: str = ""
    human_end: str = ""
    bot_end: str = ""
    eos: str = ""
    bos: str = ""

    @property
    def end_of_turn(self) -> str:
        return self.eos

    def render(self, turns: tuple[Turn, ...] | list[Turn], add_generation_prompt: bool = False) -> Rendering:
        text, supervised, contents = self.bos, [], []
        for turn in turns:
            text += getattr(self, turn.role)
            contents.append((len(text), len(text) + len(turn.content)))
            if turn.role == "bot":
                start = len(text)
                text += turn.content + self.eos
                supervised.append((start, len(text)))
                text += self.bot_end
            else:
                text += turn.content + getattr(self, f"{turn.role}_end")
        if add_generation_prompt:
            text += self.bot
        return Rendering(text, tuple(supervised), tuple(contents))

    def jinja(self) -> str:
        """A Hugging Face chat_template that renders exactly what render() does (user/assistant accepted)."""
        lit = {name: json.dumps(getattr(self, name)) for name in ROLES + ("system_end", "human_end", "bot_end")}
        return (
            ("{{- bos_token -}}" if self.bos else "")
            + "{%- for message in messages -%}"
            "{%- set role = message['role'] -%}"
            "{%- if role == 'user' -%}{%- set role = 'human' -%}"
            "{%- elif role == 'assistant' -%}{%- set role = 'bot' -%}{%- endif -%}"
            f"{{%- if role == 'system' -%}}{{{{ {lit['system']} }}}}{{{{ message['content'] }}}}{{{{ {lit['system_end']} }}}}"
            f"{{%- elif role == 'human' -%}}{{{{ {lit['human']} }}}}{{{{ message['content'] }}}}{{{{ {lit['human_end']} }}}}"
            f"{{%- elif role == 'bot' -%}}{{{{ {lit['bot']} }}}}{{% generation %}}{{{{ message['content'] }}}}{{{{ eos_token }}}}"
            f"{{% endgeneration %}}{{{{ {lit['bot_end']} }}}}"
            "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {lit['bot']} }}}}{{%- endif -%}}"
        )


PRESETS = {
    "mftcoder": ChatTemplate(
        "mftcoder",
        system="<|role_start|>system<|role_end|>",
        human="<|role_start|>human<|role_end|>",
        bot="<|role_start|>bot<|role_end|>",
    ),
    "codefuse": ChatTemplate(
        "codefuse", system="<s>system\n", human="<s>human\n", bot="<s>bot\n",
        system_end="\n", human_end="\n", bot_end="\n",
    ),
    "chatml": ChatTemplate(
        "chatml", system="<|im_start|>system\n", human="<|im_start|>user\n", bot="<|im_start|>assistant\n",
        system_end="<|im_end|>\n", human_end="<|im_end|>\n", bot_end="\n",
    ),
}
MARKER_KEYS = ROLES + ("system_end", "human_end", "bot_end")
_MARK = re.compile("\ue000(\\d+)\ue001")  # stands in for message contents while the template is probed


class ModelTemplate:
    """The chat template the tokenizer already carries, rendered by transformers. Each conversation is also
    rendered with placeholders for the contents: what lies around them is the template's own text, so every
    content's position is exact, and a bot turn's loss ends after the first control token that follows it
    (its end-of-turn token, e.g. <|im_end|> or <|eot_id|>)."""

    name = "model"

    def __init__(self, tokenizer, source: str | None = None):
        self.tokenizer = tokenizer
        if not (source or tokenizer.chat_template):
            raise ConfigError("chat_template: 'model' needs a tokenizer with a chat template, and this one has none; "
                              "choose a preset (mftcoder, codefuse, chatml)")
        self.source = source or tokenizer.get_chat_template()
        self.controls = control_token_pattern(tokenizer, self.source)
        try:
            probe = self.render((Turn("human", "Hi"), Turn("bot", "Hello")))
        except BadRecord as exc:
            raise ConfigError(f"chat_template: the model's chat template cannot be trained on: {exc}") from None
        (start, end), = probe.supervised
        self.end_of_turn = probe.text[start + len("Hello"):end]

    def jinja(self) -> str:
        return self.source

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.source, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # a template's raise_exception() or any Jinja error: this record is refused
            raise BadRecord(f"the model's chat template refused this conversation: {exc}") from None

    def render(self, turns: tuple[Turn, ...] | list[Turn], add_generation_prompt: bool = False) -> Rendering:
        roles = [HF_ROLES[t.role] for t in turns]
        text = self._apply([{"role": r, "content": t.content} for r, t in zip(roles, turns)], add_generation_prompt)
        skeleton = self._apply([{"role": r, "content": f"\ue000{i}\ue001"} for i, r in enumerate(roles)],
                               add_generation_prompt)
        parts = _MARK.split(skeleton)
        literals = parts[0::2]
        if [int(i) for i in parts[1::2]] != list(range(len(turns))):
            raise BadRecord("the model's chat template does not render every message once and in order, so the "
                            "loss mask cannot be placed")
        contents, position = [], 0
        for i, turn in enumerate(turns):
            if not text.startswith(literals[i], position):
                raise BadRecord("the model's chat template renders this conversation inconsistently")
            position += len(literals[i])
            for content in (turn.content, turn.content.strip()):  # templates that trim content are followed
                if text.startswith(content, position) and text.startswith(literals[i + 1], position + len(content)):
                    break
            else:
                raise BadRecord(f"the model's chat template changes the content of message {i} in a way the loss "
                                "mask cannot follow")
            contents.append((position, position + len(content)))
            position += len(content)
        if text[position:] != literals[-1]:
            raise BadRecord("the model's chat template renders this conversation inconsistently")
        supervised = []
        for i, turn in enumerate(turns):
            if turn.role == "bot":
                end_of_turn = self.controls.search(literals[i + 1])
                if end_of_turn is None:
                    raise BadRecord("the model's chat template writes no end-of-turn token after an assistant message "
                                f"(it writes {literals[i + 1][:40]!r}), so the model could not learn to stop")
                supervised.append((contents[i][0], contents[i][1] + end_of_turn.end()))
        return Rendering(text, tuple(supervised), tuple(contents))


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by default (Llama-style tokenizers do)."""
    if tokenizer.bos_token is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return ids[:1] == [tokenizer.bos_token_id] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != ids[:1]


def build_template(preset: str, markers: dict[str, str] | None, tokenizer) -> ChatTemplate | ModelTemplate:
    """A preset bound to the tokenizer's EOS (and BOS where it adds one), with markers overridden; or 'model'."""
    markers = markers or {}
    if preset == "model":
        if markers:
            raise ConfigError("chat_markers: only presets take markers; 'model' uses the tokenizer's own template")
        return ModelTemplate(tokenizer)
    if preset not in PRESETS:
        raise ConfigError(f"chat_template: unknown preset {preset!r}; presets: {', '.join(PRESETS)}, or 'model'")
    unknown = sorted(set(markers) - set(MARKER_KEYS))
    if unknown:
        raise ConfigError(f"chat_markers: unknown key {unknown[0]!r}; keys: {', '.join(MARKER_KEYS)}")
    for role in ROLES:
        if role in markers and not markers[role]:
            raise ConfigError(f"chat_markers.{role}: a turn prefix must not be empty")
    name = f"{preset}+custom" if markers else preset
    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    return dataclasses.replace(PRESETS[preset], name=name, eos=tokenizer.eos_token, bos=bos, **markers)


def control_token_pattern(tokenizer, chat_template: str) -> re.Pattern:
    """The tokens that only the template may write (what transformers' sanitize_control_tokens uses): special
    tokens, plus added tokens named in `chat_control_tokens` or, without that list, written literally in the
    template (whitespace tokens excepted). Longest first, so a token wins over the tokens inside it."""
    import jinja2

    listed = getattr(tokenizer, "chat_control_tokens", None)
    literal_text = "\0".join(token.value for token in jinja2.Environment().lexer.tokenize(chat_template)
                             if token.type in ("data", "string"))
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values()
              if t.special or (t.content in set(listed) if listed is not None
                               else t.content in literal_text and not t.content.isspace())}
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)")


def stop_token_ids(tokenizer, template: ChatTemplate | ModelTemplate) -> list[int]:
    """Generation ends at EOS and at the template's end-of-turn token (they differ for e.g. a base Qwen tokenizer,
    whose EOS is <|endoftext|> while its ChatML turns end with <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    for token in control_token_pattern(tokenizer, template.jinja()).findall(template.end_of_turn):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id not in ids:
            ids.append(token_id)
    return ids


def saved_template(tokenizer) -> ChatTemplate | ModelTemplate:
    """The template a saved tokenizer carries (what a checkpoint was trained with), for inference; the default
    preset when it carries none."""
    return ModelTemplate(tokenizer) if tokenizer.chat_template else build_template("mftcoder", {}, tokenizer)
