"""Models and tokenizers: load a local HF model or build a tiny one; LoRA; per-family defaults."""

from __future__ import annotations

import json
from pathlib import Path

from mftcoder.config import Config, ConfigError
from mftcoder.data.template import ChatTemplate

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TOKENIZER = ASSETS / "tokenizer"
SHIPPED_MODEL_CONFIGS = {path.stem: path for path in sorted((ASSETS / "models").glob("*.json"))}
DEMO_DATA = ASSETS / "demo_data"

# The one table of per-family defaults: LoRA target modules.
LORA_TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
}


def tokenizer_source(config: Config) -> Path:
    """Where the tokenizer comes from: tokenizer_path, else the model directory, else the shipped one."""
    return Path(config.tokenizer_path or config.pretrained_model_path or SHIPPED_TOKENIZER)


def load_tokenizer(config: Config, template: ChatTemplate):
    """The run's tokenizer, with the training template as its chat_template and a pad token set."""
    from transformers import AutoTokenizer

    source = tokenizer_source(config)
    if not source.exists():
        raise ConfigError(f"tokenizer_path: {source} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{source}: a fast tokenizer (tokenizer.json) is needed for exact loss masks")
    if tokenizer.eos_token is None:
        raise ConfigError(f"{source}: the tokenizer has no eos_token; the template ends every bot turn with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = template.jinja()
    return tokenizer


def model_config_path(name_or_path: str) -> Path:
    """A shipped model config name ('tiny-test', 'tiny-demo') or a path to a config.json."""
    if name_or_path in SHIPPED_MODEL_CONFIGS:
        return SHIPPED_MODEL_CONFIGS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model_config: {name_or_path!r} is neither a shipped config "
                          f"({', '.join(SHIPPED_MODEL_CONFIGS)}) nor a config.json file")
    return path


def read_model_config(name_or_path: str) -> dict:
    return json.loads(model_config_path(name_or_path).read_text())
