"""The one renderer: conversation -> text plus the character spans that carry loss, and its Jinja twin."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from mftcoder.config import ConfigError
from mftcoder.data.records import Turn

ROLES = ("system", "human", "bot")


@dataclass(frozen=True)
class ChatTemplate:
    """Turn markers. A turn renders as {role prefix}{content}{role end}; a bot turn as {bot}{content}{EOS}{bot_end}.

    Loss covers each bot turn's content and its EOS; everything else is context.
    """

    name: str
    system: str
    human: str
    bot: str
    system_end: str = ""
    human_end: str = ""
    bot_end: str = ""

    def prefix(self, role: str) -> str:
        return getattr(self, role)

    def render(self, turns: tuple[Turn, ...] | list[Turn], eos: str,
               add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Render turns; return the text and the [start, end) spans of bot content + EOS."""
        text = ""
        spans: list[tuple[int, int]] = []
        for turn in turns:
            text += self.prefix(turn.role)
            if turn.role == "bot":
                start = len(text)
                text += turn.content + eos
                spans.append((start, len(text)))
                text += self.bot_end
            else:
                text += turn.content + getattr(self, f"{turn.role}_end")
        if add_generation_prompt:
            text += self.bot
        return text, spans

    def jinja(self) -> str:
        """A Hugging Face chat_template that renders exactly what render() does (user/assistant accepted)."""
        lit = {name: json.dumps(getattr(self, name)) for name in ROLES + ("system_end", "human_end", "bot_end")}
        return (
            "{%- for message in messages -%}"
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
MARKER_KEYS = tuple(f.name for f in dataclasses.fields(ChatTemplate) if f.name != "name")


def build_template(preset: str, markers: dict[str, str] | None = None) -> ChatTemplate:
    """A preset, with any markers overridden (a custom template)."""
    if preset not in PRESETS:
        raise ConfigError(f"chat_template: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    template = PRESETS[preset]
    markers = markers or {}
    unknown = sorted(set(markers) - set(MARKER_KEYS))
    if unknown:
        raise ConfigError(f"chat_markers: unknown key {unknown[0]!r}; keys: {', '.join(MARKER_KEYS)}")
    if not markers:
        return template
    for role in ROLES:
        if role in markers and not markers[role]:
            raise ConfigError(f"chat_markers.{role}: a turn prefix must not be empty")
    return dataclasses.replace(template, name=f"{preset}+custom", **markers)
