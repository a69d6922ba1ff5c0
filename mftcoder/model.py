"""Models and tokenizers: load a local HF model or build a tiny one; LoRA; per-family defaults."""

from __future__ import annotations

import json
from pathlib import Path

from mftcoder.config import Config, ConfigError
from mftcoder.data.template import ChatTemplate, ModelTemplate, build_template, stop_token_ids
from mftcoder.families import attn_implementation, family

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TOKENIZER = ASSETS / "tokenizer"
SHIPPED_MODEL_CONFIGS = {path.stem: path for path in sorted((ASSETS / "models").glob("*.json"))}
DEMO_DATA = ASSETS / "demo_data"


def tokenizer_source(config: Config) -> Path:
    """Where the tokenizer comes from: tokenizer_path, else the model directory, else the shipped one."""
    return Path(config.tokenizer_path or config.pretrained_model_path or SHIPPED_TOKENIZER)


def load_tokenizer(config: Config) -> tuple[object, ChatTemplate | ModelTemplate]:
    """The run's tokenizer (a pad token set, the training template as its chat_template) and that template."""
    from transformers import AutoTokenizer

    source = tokenizer_source(config)
    if not source.exists():
        raise ConfigError(f"tokenizer_path: {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer_path: no usable tokenizer in {source} ({str(exc).splitlines()[0]}); "
                          "set tokenizer_path to a folder with tokenizer.json") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{source}: a fast tokenizer (tokenizer.json) is needed for exact loss masks")
    if tokenizer.eos_token is None:
        raise ConfigError(f"{source}: the tokenizer has no eos_token; the template ends every bot turn with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = build_template(config.chat_template, config.chat_markers, tokenizer)
    if isinstance(template, ChatTemplate):  # a model's own template(s) stay exactly as they are
        tokenizer.chat_template = template.jinja()
    return tokenizer, template


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


def load_base_model(config: Config, tokenizer, template: ChatTemplate | ModelTemplate,
                    full_weights: Path | None = None):
    """The model to fine-tune: a local HF model, or a random-initialised one from a config (seeded).
    `full_weights` (a full checkpoint being resumed) replaces either."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if full_weights or config.pretrained_model_path:
        path = Path(full_weights or config.pretrained_model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"pretrained_model_path: {path} is not a Hugging Face model directory (no config.json)")
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, config=model_config, dtype=torch.float32,
                                                     trust_remote_code=config.trust_remote_code,
                                                     attn_implementation=attn_implementation(model_config))
    elif config.model_config:
        model_config = AutoConfig.for_model(**read_model_config(config.model_config))
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code,
                                                 attn_implementation=attn_implementation(model_config))
    else:
        raise ConfigError("no model: set pretrained_model_path (a local HF model) or model_config "
                          f"(random init: {', '.join(SHIPPED_MODEL_CONFIGS)})")
    if config.model_type not in ("auto", model.config.model_type):
        raise ConfigError(f"model_type: the config says {config.model_type!r} but the model is "
                          f"{model.config.model_type!r}")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer")
    set_special_token_ids(model, tokenizer, stop_token_ids(tokenizer, template))
    return model


def set_special_token_ids(model, tokenizer, stops: list[int]) -> None:
    """The tokenizer's pad and EOS in the model config; generation stops at EOS and the end-of-turn token."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]


def prepare_for_training(model, config: Config):
    """Activation checkpointing and LoRA, as configured."""
    if config.checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.peft_type == "lora":
        model = apply_lora(model, config)
    return model



def lora_targets(config: Config, model_type: str) -> list[str] | str:
    targets = family(model_type).lora_targets
    return config.target_modules or (targets if isinstance(targets, str) else list(targets))


def apply_lora(model, config: Config):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(config, model.config.model_type)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"target_modules: {exc}") from None
    if config.checkpoint_activations:
        model.enable_input_require_grads()
    return model


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters split for AdamW: no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
