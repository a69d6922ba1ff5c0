"""Models and tokenizers: load a local HF model or build a tiny one; LoRA; per-family defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mftcoder.config import Config, ConfigError
from mftcoder.data.template import ChatTemplate, ModelTemplate, build_template, stop_token_ids
from mftcoder.families import attn_implementation, family
from mftcoder.model_folder import check_model_folder

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TOKENIZER = ASSETS / "tokenizer"
SHIPPED_MODEL_CONFIGS = {path.stem: path for path in sorted((ASSETS / "models").glob("*.json"))}
DEMO_DATA = ASSETS / "demo_data"
DEMO_PAIRS = ASSETS / "demo_pairs"  # preference pairs made from demo_data (scripts/build_demo_pairs.py)

if TYPE_CHECKING:
    import torch


def tokenizer_source(config: Config) -> Path:
    """Where the tokenizer comes from: tokenizer_path, else the model directory, else the shipped one."""
    return Path(config.tokenizer_path or config.pretrained_model_path or SHIPPED_TOKENIZER)


def load_tokenizer(config: Config) -> tuple[object, ChatTemplate | ModelTemplate]:
    """The run's tokenizer (a pad token set, the training template as its chat_template) and that template."""
    from transformers import AutoTokenizer

    source = tokenizer_source(config)
    key = "pretrained_model_path" if config.pretrained_model_path and not config.tokenizer_path else "tokenizer_path"
    if not source.exists():
        raise ConfigError(f"{key}: {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: no usable tokenizer in {source} ({str(exc).splitlines()[0]}); "
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
                    full_weights: Path | None = None, empty: bool = False):
    """The model to fine-tune, in the torch_dtype weights dtype: a local HF model, or a random-initialised one
    from a config (seeded). `full_weights` (a full checkpoint being resumed) replaces either. `empty`: the same
    model on the meta device, no weights read or initialised (the ranks of a sharded load other than 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = weights_dtype(config)
    if full_weights or config.pretrained_model_path:
        path = Path(full_weights or config.pretrained_model_path)
        check_model_folder(path, "resume_from_checkpoint" if full_weights else "pretrained_model_path",
                           config.trust_remote_code, weights=not empty)
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = empty_model(model_config, config, dtype) if empty else AutoModelForCausalLM.from_pretrained(
            path, config=model_config, dtype=dtype, trust_remote_code=config.trust_remote_code,
            attn_implementation=attn_implementation(model_config, config.attn_implementation),
            **quantized_loading(config))
    elif config.model_config:
        if config.quantization:
            raise ConfigError(f"quantization: {config.quantization} quantizes a model's weights while loading them "
                              "from pretrained_model_path; a random-initialised model_config model has none (save it "
                              "with save_pretrained and set pretrained_model_path to that folder)")
        model_config = AutoConfig.for_model(**read_model_config(config.model_config))
        torch.manual_seed(config.seed)
        model = empty_model(model_config, config, dtype) if empty else AutoModelForCausalLM.from_config(
            model_config, dtype=dtype, trust_remote_code=config.trust_remote_code,
            attn_implementation=attn_implementation(model_config, config.attn_implementation))
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
    if config.quantization:
        keep_4bit_layers_differentiable(model)
    return model


def quantized_loading(config: Config) -> dict:
    """from_pretrained arguments for QLoRA: the base quantized by bitsandbytes while loading, straight onto this
    process's device (quantized weights are not moved or cast afterwards); {} without quantization."""
    if not config.quantization:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantization: {config.quantization} needs bitsandbytes: pip install bitsandbytes "
                          "(or pip install -e \".[qlora]\")") from None
    on_gpu = torch.cuda.is_available()
    if config.quantization == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        # 4-bit weights are dequantized for each matmul in the compute dtype: bf16 on GPU; float32 on CPU, where bf16
        # saved ~20% of a step's CPU time on SmolLM2-135M but its rounding (packed vs alone: 0.12 per-token loss,
        # float32 1e-5) made the start-up packing check turn packing off.
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32)
    device_map = {"": torch.cuda.current_device()} if on_gpu else "cpu"  # the local rank's GPU (set by torchrun start-up)
    return {"quantization_config": quantization, "device_map": device_map}


def keep_4bit_layers_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers in their trainable layout. On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a
    layer for its CPU inference kernel at its first eval-mode forward (the start-up checks, evaluation); that kernel
    has no backward, so no gradient would flow back through the frozen base layers any more (measured: layer-0 LoRA
    gradients 55% off), and every checkpoint save would re-quantize the block scales in place."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # the flag bitsandbytes sets from the CPU's features
            module.support_avx512bf16_for_cpu = False


def weights_dtype(config: Config) -> torch.dtype:
    """The dtype the model is loaded in (torch_dtype). 'auto': float32 on CPU (bf16 there was measured far slower);
    on a GPU bfloat16 for the frozen base of a LoRA run, float32 master weights for full fine-tuning (its bf16
    compute comes from autocast / the FSDP mixed-precision policy)."""
    import torch

    if config.torch_dtype != "auto":
        return getattr(torch, config.torch_dtype)
    return torch.bfloat16 if torch.cuda.is_available() and config.peft_type else torch.float32


def empty_model(model_config, config: Config, dtype: torch.dtype) -> torch.nn.Module:
    """The model's skeleton on the meta device: every parameter and buffer with its shape and dtype, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=config.trust_remote_code,
                                                attn_implementation=attn_implementation(model_config,
                                                                                        config.attn_implementation))


def base_model_dtype(config: Config) -> torch.dtype:
    """The base model's own dtype, as its config.json states it (`dtype`, or the older `torch_dtype`); float32
    for a random-initialised model_config model, or a config.json that states none."""
    import torch

    if not config.pretrained_model_path:
        return torch.float32
    stated = json.loads((Path(config.pretrained_model_path) / "config.json").read_text())
    name = stated.get("dtype") or stated.get("torch_dtype") or "float32"
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"save_dtype: auto follows the base model's dtype, but {config.pretrained_model_path}/"
                          f"config.json states {name!r}; set save_dtype explicitly")
    return dtype


def save_dtype(config: Config) -> torch.dtype:
    """The dtype of saved full-model weights (save_dtype): 'auto' is the base model's own dtype."""
    import torch

    return base_model_dtype(config) if config.save_dtype == "auto" else getattr(torch, config.save_dtype)


def set_special_token_ids(model, tokenizer, stops: list[int]) -> None:
    """The tokenizer's pad and EOS in the model config; generation stops at EOS and the end-of-turn token."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]


def prepare_for_training(model, config: Config):
    """Activation checkpointing and LoRA, as configured.

    A quantized base needs nothing more: peft's prepare_model_for_kbit_training would freeze the base (LoRA does),
    upcast its bf16/fp16 non-quantized weights to float32 (embeddings, norms, output layer: more memory for frozen
    weights), and turn on activation checkpointing whether or not checkpoint_activations asks for it."""
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
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)  # adapters in float32 on a bf16 base
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


def position_limit_notice(config: Config) -> str | None:
    """A warning when seq_length is above the model's max_position_embeddings (None when it is not, or when the
    model's config cannot be read here: loading the model reports that)."""
    source = config.model_config or config.pretrained_model_path
    if not source:
        return None
    try:
        limit = read_model_config(source).get("max_position_embeddings")
    except (ConfigError, OSError, ValueError, AttributeError):
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or config.seq_length <= limit:
        return None
    return (f"seq_length: {config.seq_length} is above the model's max_position_embeddings ({limit}, in {source}): "
            f"positions past {limit} were never trained (a model with learned position embeddings fails there); "
            f"lower seq_length to {limit} or extend the model's context (e.g. rope_scaling)")
