"""The one config schema: every field, its help text, the reference's names, and validation."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from mftcoder.atorch_strategy import parse_strategy
from mftcoder.config_text import ConfigError, YamlProblem, brief, read_json, read_yaml, yaml_error


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: finite numbers from `low` to `high` (each bound inclusive unless open),
    plus `special` values that mean something else (e.g. max_steps -1: all epochs). null stays null."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: dict[float, str] = field(default_factory=dict)

    def __contains__(self, value: float) -> bool:
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        above_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high

    def __str__(self) -> str:
        low = None if self.low is None else f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
        text = " and ".join(part for part in (low, high) if part) or "a finite number"
        return text + "".join(f", or {_number(value)} ({meaning})" for value, meaning in self.special.items())


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


POSITIVE_INT = Range(1)
NON_NEGATIVE = Range(0)


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, section: str = "train",
        valid: Range | None = None) -> Any:
    """A config field with help text, allowed values (`choices`) or a numeric range (`valid`) as metadata."""
    meta = {"help": help, "choices": choices, "section": section, "range": valid}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Everything a run needs. Names follow the reference (MFTCoder, Atorch edition) where it has one."""

    # --- data -------------------------------------------------------------------------------
    data_paths: list[str] = opt([], "Task folders; each folder's basename is the task name. Also '[a,b]'.", section="data")
    tasks: dict[str, str] = opt({}, "Explicit task map {name: folder}, instead of or besides data_paths.", section="data")
    data_split: str = opt("95,5,0", "Per-task train,valid,test proportions (normalized), e.g. '95,5,0'.", section="data")
    shuffle_before_split: bool = opt(True, "Shuffle each task (from seed) before splitting; else split in file order.", section="data")
    data_weights: list[float] | dict[str, float] = opt([], "Per-task sampling weights per epoch (1 = each sample once, 2 = twice, 0.5 = a random half). List in task order or {task: w}.", section="data", valid=NON_NEGATIVE)
    on_bad_record: str = opt("error", "Bad JSONL records: 'error' reports all and stops; 'skip' skips and counts them.", ("error", "skip"), section="data")
    over_length: str = opt("truncate", "Samples longer than seq_length: 'truncate' them or 'drop' them (counted either way).", ("truncate", "drop"), section="data")
    seq_length: int = opt(2048, "Maximum tokens per sample (the model's input length).", section="data", valid=Range(2, 2**24))
    chat_template: str = opt("mftcoder", "Template: a preset ('mftcoder', the reference's <|role_start|>role<|role_end|>; 'codefuse', <s>human\\n; 'chatml') or 'model' (the chat template the tokenizer carries).", ("mftcoder", "codefuse", "chatml", "model"), section="data")
    chat_markers: dict[str, str] = opt({}, "Override template markers: keys system, human, bot (turn prefixes), system_end, human_end, bot_end (text after the bot's EOS).", section="data")
    tokenizer_path: str | None = opt(None, "Tokenizer directory (default: pretrained_model_path, else the shipped GPT-NeoX-20B tokenizer). Alias: vocab_file.", section="data")
    data_cache_dir: str | None = opt(None, "Where tokenized data is cached (default $MFTCODER_CACHE or ~/.cache/mftcoder).", section="data")
    overwrite_cache: bool = opt(False, "Tokenize again even when a matching cache exists.", section="data")
    preprocessing_num_workers: int | None = opt(None, "Processes for tokenization (default: CPU count, used only for large data).", section="data", valid=POSITIVE_INT)
    load_raw_dataset: bool = opt(True, "Reference placeholder: raw JSONL is the only input; must be true.", section="data")
    tokenize_mode: str = opt("sft", "Reference placeholder: only 'sft' (chat samples with a bot-turn loss mask).", ("sft",), section="data")
    pretrain_file_extensions: list[str] = opt([".py"], "objective pretrain: besides {\"content\": ...} JSONL records, every file under a task folder whose name ends with one of these is read whole as one document, e.g. ['.py', '.js']; [] for JSONL only. Read only with objective: pretrain.", section="data")

    # --- model ------------------------------------------------------------------------------
    pretrained_model_path: str | None = opt(None, "Local Hugging Face model directory to fine-tune.", section="model")
    model_config: str | None = opt(None, "Build a random-initialised model instead: a shipped config name ('tiny-test', 'tiny-demo') or a config.json path.", section="model")
    model_type: str = opt("auto", "Model family for per-family defaults ('auto' reads it from the model config; the reference's value is 'gpt_neox').", section="model")
    trust_remote_code: bool = opt(False, "Allow model code from the model directory to run. Off unless you ask.", section="model")
    peft_type: str | None = opt(None, "Parameter-efficient method: null (full fine-tuning) or 'lora'.", (None, "lora"), section="model")
    lora_rank: int = opt(8, "LoRA rank r.", section="model", valid=POSITIVE_INT)
    lora_alpha: float = opt(16.0, "LoRA scaling alpha.", section="model", valid=Range(0, low_open=True))
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", section="model", valid=Range(0, 1, high_open=True))
    target_modules: list[str] = opt([], "Modules LoRA wraps (default: the family's table, else 'all-linear').", section="model")
    checkpoint_activations: bool = opt(False, "Gradient checkpointing: keep only each decoder layer's input and recompute the rest in backward (much less memory, about a third more compute).", section="model")
    max_forward_tokens: int | None = opt(None, "Run each micro-batch in forward/backward passes of at most this many tokens (whole rows; exact: the loss is normalized over the optimizer step). Activation memory is proportional to it. null: 1024 on CPU (where smaller passes cost no speed), no limit on GPU; 0: no limit.", section="model", valid=NON_NEGATIVE)
    attn_implementation: str = opt("auto", "Attention kernel: 'auto' (the family's choice: sdpa, or eager where the model needs it), 'sdpa', 'eager', 'flex_attention', 'flash_attention_2' (where installed). Packed samples stay isolated in each.", ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2"), section="model")
    torch_dtype: str = opt("auto", "Weights dtype. 'auto': float32 on CPU (bf16 is far slower there); on GPU the frozen base of LoRA/QLoRA in bfloat16, full fine-tuning in float32 master weights with bf16 compute (autocast / FSDP mixed precision). 'bfloat16' halves weight memory anywhere; LoRA adapters stay float32; full fine-tuning then has no float32 master weights, so updates below ~1/256 of a weight round away (a note says so).", ("auto", "float32", "bfloat16"), section="model")
    save_dtype: str = opt("auto", "dtype of saved full-model weights (full checkpoints, the random base of a LoRA run): 'auto' (the base model's own, as its config.json states; float32 for a random-init model), 'float32', 'bfloat16', 'float16'. Only the saved copy is cast. Where it is narrower than the training weights, the checkpoint also keeps those exactly (resume/weights), so resume stays exact. LoRA adapters are saved as trained (float32).", ("auto", "float32", "bfloat16", "float16"), section="model")
    quantization: str | None = opt(None, "QLoRA: load the frozen base quantized with bitsandbytes, 'nf4' (4-bit) or 'int8'; needs peft_type: lora.", (None, "nf4", "int8"), section="model")
    bf16: bool | None = opt(None, "bf16 autocast: null = on when a GPU supports it, off on CPU.", section="model")
    fp16: bool = opt(False, "fp16 is not supported (use bf16); only false is accepted.", section="model")
    tp: int = opt(1, "Tensor-parallel size; only 1 is supported (as in the reference).", section="model", valid=Range(1, 1))
    distributed_strategy: str = opt("ddp", "Under torchrun: 'ddp' (replicas), 'fsdp' (FSDP2: parameters, gradients and optimizer state sharded per decoder layer; one process shards over a group of one) or 'atorch' (ATorch's auto_accelerate with atorch_strategy; bash scripts/setup.sh atorch).", ("ddp", "fsdp", "atorch"), section="model")
    fsdp_gradient_sync: str = opt("every_pass", "distributed_strategy: fsdp, when an optimizer step has several forward/backward passes (gradient_accumulation_steps, max_forward_tokens): 'every_pass' reduce-scatters each pass's gradients, so every rank keeps only its shard of them (1/N of the gradient memory, one reduce-scatter per pass); 'step' accumulates full unsharded gradients on every rank and reduces once per step (full-size gradients on each rank). Measured in docs/benchmarks.md.", ("every_pass", "step"), section="model")
    atorch_strategy: list[Any] | None = opt(None, "distributed_strategy: atorch: ATorch's load_strategy, entries 'name' or [name, config]: parallel_mode, zero1, checkpoint (CPU and GPU); fsdp, zero2, [amp_native, {dtype: bf16}] (GPU). Layer classes by name (default: the model's decoder layers). null: on GPU the reference's [parallel_mode, fsdp, [amp_native, {dtype: bf16}], checkpoint] (LoRA: parallel_mode and bf16), on CPU [parallel_mode].", section="model")
    dp: int | None = opt(None, "Data-parallel size (the reference's launchers pass it); must equal the number of processes.", section="model", valid=POSITIVE_INT)

    # --- optimisation -------------------------------------------------------------------------
    num_train_epochs: int = opt(1, "Epochs over the training split.", valid=POSITIVE_INT)
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: run all epochs).", valid=Range(1, special={-1: "all epochs"}))
    per_device_train_batch_size: int | None = opt(None, "Samples (rows when packing) per micro-batch on each process (null: 8, or total_train_batch_size / processes).", valid=POSITIVE_INT)
    total_train_batch_size: int | None = opt(None, "Samples per micro-batch over all processes (the reference's key): per_device_train_batch_size = total / processes.", valid=POSITIVE_INT)
    per_device_valid_batch_size: int = opt(8, "Samples per evaluation batch on each process.", valid=POSITIVE_INT)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", valid=POSITIVE_INT)
    learning_rate: float = opt(1e-5, "Peak learning rate (1e-5 full fine-tuning, 1e-4..2e-4 LoRA).", valid=Range(0, low_open=True))
    min_lr: float = opt(0.0, "Floor of the cosine schedule (usually learning_rate / 10).", valid=NON_NEGATIVE)
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to biases and norms).", valid=NON_NEGATIVE)
    adam_beta1: float = opt(0.9, "AdamW beta1.", valid=Range(0, 1, high_open=True))
    adam_beta2: float = opt(0.999, "AdamW beta2.", valid=Range(0, 1, high_open=True))
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", valid=Range(0, low_open=True))
    lr_scheduler_type: str = opt("cosine", "Schedule after warmup: cosine (to min_lr), linear (to 0), constant. Alias: custom_lr_scheduler_type.", ("cosine", "linear", "constant", "constant_with_warmup"))
    num_warmup_steps: int = opt(0, "Linear warmup steps.", valid=NON_NEGATIVE)
    max_grad_norm: float | None = opt(1.0, "Clip gradients to this global norm (null or 0: no clipping).", valid=NON_NEGATIVE)
    weighted_loss_mode: str = opt("case3", "Multi-task loss: case1 token mean, case2 sample mean, case3 per-task token mean, case4 per-task sample mean (case3/4 weighted by task_weights); coba (case3 with weights from the convergence balancer: validation-loss slopes) or dwa (case3 with dynamic weight average: training-loss ratios).", ("case1", "case2", "case3", "case4", "coba", "dwa"))
    task_weights: list[float] | dict[str, float] = opt([], "Per-task loss weights for case3/case4 (list in task order or {task: w}).", valid=NON_NEGATIVE)
    coba_warmup_steps: int = opt(100, "coba: optimizer steps of equal weights before the balancer starts (about the number of validation batches is a good start).", valid=POSITIVE_INT)
    coba_history_length: int = opt(200, "coba: optimizer steps of validation-loss history each slope is fitted over (2-5x the warm-up; longer: calmer weights).", valid=Range(2))
    coba_tau: float = opt(5.0, "coba: temperature of the divergence factor (larger: switches to the divergence score sooner).", valid=Range(0, low_open=True))
    coba_update_interval: int = opt(1, "coba: optimizer steps between weight updates (each samples the validation set once).", valid=POSITIVE_INT)
    coba_sample_valid_num: int = opt(1, "coba: validation micro-batches per update, drawn from a seeded, endless walk over the validation split (each rank its share).", valid=POSITIVE_INT)
    dwa_window: int = opt(10, "dwa: optimizer steps whose mean per-task training loss is compared with the window before.", valid=POSITIVE_INT)
    dwa_temperature: float = opt(2.0, "dwa: softmax temperature of the loss ratios (larger: weights closer to equal).", valid=Range(0, low_open=True))
    max_nonfinite_steps: int = opt(3, "Stop with an error after this many NaN/inf losses in a row (each skips its update).", valid=POSITIVE_INT)
    padding_mode: str = opt("auto", "Batch shape: 'pack' fills rows of seq_length with whole samples (isolated from each other; per_device_train_batch_size counts rows); 'dynamic' pads to the longest sample of a length-grouped batch; 'padding' pads every sample to seq_length (the reference); 'auto' packs when a start-up check shows the model keeps packed samples apart, else dynamic.", ("auto", "pack", "dynamic", "padding"))
    num_workers: int = opt(0, "DataLoader worker processes.", valid=NON_NEGATIVE)
    seed: int = opt(42, "Seed for splits, sampling order, initialisation and dropout.", valid=Range(0, 2**63 - 1))
    train_mode: str = opt("sft", "Reference placeholder: only 'sft'.", ("sft",))
    objective: str = opt("sft", "What the run learns: 'sft' (chat records, loss on the bot turns), 'dpo' or 'orpo' (preference pairs: chosen and rejected answers to one prompt), 'pretrain' (raw text: every token). Alias: xxpo (dpo or orpo).", ("sft", "dpo", "orpo", "pretrain"))
    beta: float = opt(0.1, "dpo: the implicit reward's scale (larger: stays closer to the reference model); orpo: the weight of the odds-ratio term.", valid=Range(0, low_open=True))
    dpo_loss: str = opt("sigmoid", "dpo: 'sigmoid' (the DPO paper), 'ipo' (squared distance of the margin from 1/(2 beta)) or 'hinge' (max(0, 1 - beta x margin)).", ("sigmoid", "ipo", "hinge"))
    rpo_alpha: float | None = opt(None, "dpo: add the chosen answer's token-mean NLL with this weight (RPO); null: off.", valid=NON_NEGATIVE)
    train_iters: int | None = opt(None, "Reference placeholder: accepted and ignored (it never set the number of steps there either).", valid=Range())

    # --- evaluation, checkpoints, logs ----------------------------------------------------------
    evaluation_strategy: str = opt("steps", "When to evaluate: 'steps', 'epoch', 'steps,epoch' or 'no'.", ("steps", "epoch", "steps,epoch", "no"), section="eval")
    evaluation_steps: int = opt(100, "Optimizer steps between evaluations. Aliases: evalation_steps, valid_interval.", section="eval", valid=POSITIVE_INT)
    valid_iters: int | None = opt(None, "Cap on evaluation batches per evaluation (null: the whole validation split).", section="eval", valid=POSITIVE_INT)
    metric_for_best_model: str = opt("loss", "Validation metric that ranks checkpoints: 'loss', 'loss/<task>', or with generation_eval 'pass@1' or 'pass@1/<benchmark>'.", section="eval")
    greater_is_better: bool | None = opt(None, "Whether a larger metric is better (null: from the metric, lower loss and higher pass@1).", section="eval")
    generation_eval: list[str] = opt([], "At each evaluation, generate code for these benchmarks and run it in a sandbox: 'humaneval' and/or JSONL files of problems with tests (docs/eval.md). Greedy decoding; logs pass@1 and pass@1/<benchmark>. Under torchrun the problems are split across ranks.", section="eval")
    generation_eval_problems: int = opt(20, "Problems per generation_eval benchmark: its first N, the same at every evaluation (-1: all).", section="eval", valid=Range(1, special={-1: "all"}))
    generation_eval_max_new_tokens: int = opt(256, "generation_eval: longest answer per problem, in tokens.", section="eval", valid=POSITIVE_INT)
    generation_eval_batch_size: int = opt(8, "generation_eval: prompts per generation batch.", section="eval", valid=POSITIVE_INT)
    generation_eval_timeout: float = opt(10.0, "generation_eval: seconds each generated program may run.", section="eval", valid=Range(0, low_open=True))
    early_stopping_patience: int = opt(-1, "Stop after this many evaluations without improvement (-1: never).", section="eval", valid=Range(1, special={-1: "never"}))
    output_dir: str | None = opt(None, "Checkpoints, metrics and logs go here (null: ./outputs of the folder the command runs in). One run at a time: a second run on a folder a live run holds is refused.", section="eval")
    tensorboard_dir: str | None = opt(None, "TensorBoard event files (default output_dir/runs).", section="eval")
    save_strategy: str = opt("steps", "When to save: 'steps' (every checkpointing_steps), 'epoch', 'steps,epoch'.", ("steps", "epoch", "steps,epoch"), section="eval")
    checkpointing_steps: int = opt(500, "Optimizer steps between checkpoints.", section="eval", valid=POSITIVE_INT)
    extra_save_by_epoch: bool = opt(False, "Also save checkpoint-epoch-{k} at each epoch end (always kept).", section="eval")
    save_total_limit: int | None = opt(None, "Keep at most this many step checkpoints: the best and the newest first.", section="eval", valid=POSITIVE_INT)
    resume_from_checkpoint: str | None = opt(None, "'auto' (newest complete checkpoint in output_dir) or a checkpoint path.", section="eval")
    overwrite_output_dir: bool = opt(False, "A new run into an output_dir that holds another run's checkpoints (or, when resuming, checkpoints newer than the one resumed from) is refused, so two runs never mix; true removes them first.", section="eval")
    log_interval: int = opt(10, "Optimizer steps between log lines.", section="eval", valid=POSITIVE_INT)
    plot_curves: bool = opt(True, "At the end, draw output_dir/curves.png: per-task training and validation loss and the task weights over steps (needs matplotlib: pip install 'mftcoder[plot]').", section="eval")
    evaluate_before_training: bool = opt(True, "Evaluate once before the first step (logged as step 0; the baseline).", section="eval")


ALIASES = {
    "evalation_steps": "evaluation_steps",
    "valid_interval": "evaluation_steps",
    "custom_lr_scheduler_type": "lr_scheduler_type",
    "vocab_file": "tokenizer_path",
    "gradient_checkpointing": "checkpoint_activations",
    "max_train_steps": "max_steps",
    "xxpo": "objective",
}
OBJECTIVE_KEYS = {"beta": ("dpo", "orpo"), "dpo_loss": ("dpo",), "rpo_alpha": ("dpo",),
                  "pretrain_file_extensions": ("pretrain",)}  # keys only these objectives read
_NULL_STRINGS = {"", "none", "null", "false"}
PLACEHOLDER_NOTICES = {
    "train_iters": "train_iters is a placeholder (as in the reference): it does not set the number of steps; use max_steps.",
    "load_raw_dataset": "load_raw_dataset: raw JSONL is the only input format, as the reference requires.",
    "tokenize_mode": "tokenize_mode: 'sft' is the only mode (chat samples, loss on bot turns).",
    "train_mode": "train_mode: 'sft' is the only mode.",
}


def fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _closest(name: str) -> str:
    candidates = list(fields()) + list(ALIASES)
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _parse_list_string(key: str, text: str) -> list[str]:
    """'[a, b]', 'a,b' or '["a","b"]' -> ['a', 'b'] (the reference passes data_paths as a string)."""
    text = text.strip()
    if text.startswith("[") != text.endswith("]"):
        raise ConfigError(f"{key}: malformed list {brief(text)} (unbalanced brackets); write '[a,b]' or 'a,b'")
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(x) for x in parsed]
        except json.JSONDecodeError:
            pass
        text = text[1:-1]
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]


def _yaml_value(key: str, text: str) -> Any:
    """A value given as YAML text (a nested list from the command line), or ConfigError naming the key."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {yaml_error(exc).reason}") from None
    except YamlProblem as exc:
        raise ConfigError(f"{key}: {exc.reason}") from None


def _means_null(value: Any, options: list[Any]) -> bool:
    """The reference's launchers pass 'false' or 'none' for unset paths; bool fields keep 'false'."""
    return isinstance(value, str) and value.strip().lower() in _NULL_STRINGS and bool not in options


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        nullable = len(options) < len(typing.get_args(tp))
        if nullable and (value is None or _means_null(value, options)):
            return None
        errors = []
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if tp is Any:  # plain data, checked where it is used (atorch_strategy)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {brief(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {brief(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {brief(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {brief(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {brief(value)}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):  # a flow list from the command line; nested plain data is read as YAML
            value = _yaml_value(key, value) if item_type is Any else _parse_list_string(key, value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {brief(value)}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: not a valid mapping: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {brief(value)}")
        return {str(k): _coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in the schema, not user input


def _canonical_key(key: str) -> str:
    key = key.strip().lstrip("-").replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in fields():
        raise ConfigError(f"unknown config key {brief(key)}{_closest(key) if len(key) <= 100 else ''}")
    return key


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a plain mapping."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    try:
        data = read_json(text) if path.suffix == ".json" else read_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error(exc).at(str(path))) from None
    except YamlProblem as exc:
        raise ConfigError(exc.at(str(path))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=1e-4', 'data_paths=[a,b]'] -> mapping; values are read as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {brief(item)} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            out[key] = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
        except YamlProblem as exc:
            raise ConfigError(f"{key.strip()}: {exc.reason}") from None
    return out


def build_config(values: dict[str, Any]) -> tuple[Config, list[str]]:
    """Validate a mapping into a Config; returns it with the notices to show the user."""
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = _canonical_key(str(raw_key))
        if key == "output_dir" and isinstance(value, str) and not value.strip():
            raise ConfigError("output_dir: empty; name a folder (or leave the key out for ./outputs)")
        kwargs[key] = _coerce(key, value, hints[key])
    config = Config(**kwargs)
    notices = validate(config, given=set(kwargs))
    return config, notices


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, list[str]]:
    """Read a config file plus key=value overrides; relative paths in the file resolve against its folder."""
    file_values = {_canonical_key(str(k)): v for k, v in read_config_file(path).items()} if path else {}
    cli_values = {_canonical_key(k): v for k, v in parse_overrides(overrides or []).items()}
    config, notices = build_config({**file_values, **cli_values})
    if path:
        _resolve_paths(config, Path(path).resolve().parent, keys=set(file_values) - set(cli_values))
    return config, notices


_PATH_KEYS = ("output_dir", "tensorboard_dir", "pretrained_model_path", "tokenizer_path", "data_cache_dir")


def _resolve_paths(config: Config, base_dir: Path, keys: set[str]) -> None:
    """Resolve the relative paths among `keys` against base_dir (the config file's folder)."""

    def resolve(p: str) -> str:
        return p if Path(p).is_absolute() else str((base_dir / p).resolve())

    if "data_paths" in keys:
        config.data_paths = [resolve(p) for p in config.data_paths]
    if "generation_eval" in keys:
        config.generation_eval = [p if p == "humaneval" else resolve(p) for p in config.generation_eval]
    if "tasks" in keys:
        config.tasks = {k: resolve(v) for k, v in config.tasks.items()}
    for key in _PATH_KEYS:
        if key in keys and getattr(config, key) is not None:
            setattr(config, key, resolve(getattr(config, key)))
    if "model_config" in keys and config.model_config and config.model_config.endswith(".json"):
        config.model_config = resolve(config.model_config)


def split_fractions(text: str) -> tuple[float, float, float]:
    """'95,5,0' -> (0.95, 0.05, 0.0); also accepts '0.9,0.1' and '/' separators."""
    parts = [p for p in text.replace("/", ",").split(",") if p.strip()]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data_split: expected numbers like '95,5,0', got {brief(text)}") from None
    if not all(math.isfinite(n) for n in numbers) or not math.isfinite(sum(numbers)):
        raise ConfigError(f"data_split: expected finite numbers like '95,5,0', got {brief(text)}")
    if not 1 <= len(numbers) <= 3 or any(n < 0 for n in numbers) or sum(numbers) <= 0:
        raise ConfigError(f"data_split: expected up to three non-negative numbers with a positive sum, got {brief(text)}")
    numbers += [0.0] * (3 - len(numbers))
    total = sum(numbers)
    return (numbers[0] / total, numbers[1] / total, numbers[2] / total)


TASK_NAME = re.compile(r"[\w.-]+")  # letters and digits of any script, '_', '.', '-'
MAX_TASK_NAME_BYTES = 100


def task_name_problem(name: str) -> str | None:
    """Why `name` cannot be a task name (it becomes a file name in the data cache), or None when it can."""
    if not TASK_NAME.fullmatch(name):
        return "is not a name: use letters, digits, '_', '.' and '-' only (no '/', spaces or other characters)"
    if name.startswith("."):
        return "starts with '.'; a task name may not (it would be a hidden or relative path)"
    if len(name.encode()) > MAX_TASK_NAME_BYTES:
        return f"is {len(name.encode())} bytes long (UTF-8); a task name may have at most {MAX_TASK_NAME_BYTES}"
    return None


def check_range(name: str, value: Any, valid: Range | None) -> None:
    """ConfigError unless a numeric value (or each weight of a list/mapping) lies in its range; null passes."""
    if value is None or valid is None or isinstance(value, (str, bool)):
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
    for key, item in items:
        if item not in valid:
            where = name if key is None else f"{name}[{key}]" if isinstance(key, int) else f"{name}.{key}"
            raise ConfigError(f"{where}: {brief(item)} is out of range; expected {valid}")


def validate(config: Config, given: set[str]) -> list[str]:
    """Check values and combinations; return notices for placeholder arguments that were given."""
    for name, f in fields().items():
        choices = f.metadata.get("choices")
        value = getattr(config, name)
        if choices and value not in choices:
            match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            raise ConfigError(f"{name}: {brief(value)} is not one of {', '.join(map(str, choices))}{hint}")
    if config.tp != 1:
        raise ConfigError(f"tp: tensor parallelism is not supported (as in the reference, only tp=1), got {config.tp}")
    for name, f in fields().items():
        check_range(name, getattr(config, name), f.metadata["range"])
    if config.min_lr > config.learning_rate:
        raise ConfigError(f"min_lr ({config.min_lr}) is above learning_rate ({config.learning_rate})")
    if config.quantization and config.peft_type != "lora":
        raise ConfigError(f"quantization: {config.quantization} trains LoRA adapters on a frozen quantized base; "
                          "set peft_type: lora")
    if config.quantization and config.distributed_strategy == "fsdp":
        raise ConfigError(f"quantization: {config.quantization} is not supported with distributed_strategy: fsdp "
                          "(sharding bitsandbytes weights); use distributed_strategy: ddp")
    if config.distributed_strategy == "atorch" and config.atorch_strategy is not None:
        parse_strategy(config.atorch_strategy)
    elif config.atorch_strategy is not None:
        raise ConfigError(f"atorch_strategy: read only with distributed_strategy: atorch (this run has "
                          f"{config.distributed_strategy})")
    _, valid_share, _ = split_fractions(config.data_split)
    for name in _PATH_KEYS + ("data_paths", "tasks", "model_config"):
        value = getattr(config, name)
        texts = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if any(isinstance(t, str) and "\0" in t for t in texts):
            raise ConfigError(f"{name}: a path holds a NUL character, which no file name can")
    for task_name in config.tasks:
        problem = task_name_problem(task_name)
        if problem:
            raise ConfigError(f"tasks: task name {brief(task_name)} {problem}")
    for extension in config.pretrain_file_extensions:
        if not (isinstance(extension, str) and len(extension) > 1 and extension.startswith(".") and "/" not in extension):
            raise ConfigError(f"pretrain_file_extensions: {brief(extension)} is not a file name ending like '.py'")
        if extension == ".jsonl":
            raise ConfigError("pretrain_file_extensions: '.jsonl' files are always read, as {\"content\": ...} records, "
                              "never as source text; leave it out")
    if not config.load_raw_dataset:
        raise ConfigError("load_raw_dataset: only raw JSONL input is supported; set it to true (or leave it out)")
    if config.fp16:
        raise ConfigError("fp16: not supported (fp16 training needs loss scaling); use bf16: true on a GPU")
    metric = config.metric_for_best_model
    if metric != "loss" and not metric.startswith(("loss/", "pass@1")):
        raise ConfigError(f"metric_for_best_model: expected 'loss', 'loss/<task>', 'pass@1' or 'pass@1/<benchmark>', "
                          f"got {brief(metric)}")
    if metric.startswith("pass@1") and not config.generation_eval:
        raise ConfigError(f"metric_for_best_model: {metric} is measured by generation_eval; name its benchmarks, "
                          "e.g. generation_eval: [humaneval]")
    if metric.startswith("pass@1") and config.greater_is_better is False:
        raise ConfigError(f"greater_is_better: false would keep the checkpoints with the lowest {metric}; "
                          "leave it out (or true)")
    if config.greater_is_better is None:
        config.greater_is_better = metric.startswith("pass@")
    if config.pretrained_model_path and config.model_config:
        raise ConfigError("give either pretrained_model_path (fine-tune a model) or model_config (random init), not both")
    for name in ("data_weights", "task_weights"):
        weights = getattr(config, name)
        if weights and not any(weights.values() if isinstance(weights, dict) else weights):
            what = "sampled" if name == "data_weights" else "learned"
            raise ConfigError(f"{name}: every weight is 0, so no task would be {what}; give one a positive weight")
    if config.weighted_loss_mode in ("coba", "dwa") and config.task_weights:
        raise ConfigError(f"task_weights: fixed weights do not combine with weighted_loss_mode: "
                          f"{config.weighted_loss_mode}, which sets the weights itself; remove one of them")
    notices = [PLACEHOLDER_NOTICES[k] for k in sorted(given) if k in PLACEHOLDER_NOTICES]
    for key, objectives in OBJECTIVE_KEYS.items():
        if key in given and config.objective not in objectives:
            notices.append(f"{key} is read only with objective: {' or '.join(objectives)} (this run has objective: "
                           f"{config.objective}); it is ignored")
    if valid_share == 0 and config.evaluation_strategy != "no" and not config.generation_eval:
        notices.append(f"data_split {config.data_split!r} leaves no validation samples, so evaluation_strategy: "
                       f"{config.evaluation_strategy} never evaluates (no validation loss, no best checkpoint); give "
                       "data_split a validation share (e.g. '95,5,0') or set evaluation_strategy: no")
    if config.torch_dtype == "bfloat16" and not config.peft_type:
        notices.append("torch_dtype: bfloat16 with full fine-tuning keeps no float32 master weights: AdamW updates "
                       "below ~1/256 of a weight round away (at learning_rate 1e-5, most of them); use torch_dtype "
                       "auto or float32 (bf16: true still computes in bf16) unless memory forces bf16 weights")
    return notices


def resolve_for_world(config: Config, world_size: int) -> Config:
    """The settings that depend on the number of processes: `dp` must equal it, and `total_train_batch_size`
    (the reference's global micro-batch) sets the per-process batch."""
    if config.dp is not None and config.dp != world_size:
        raise ConfigError(f"dp: set to {config.dp} but {world_size} process(es) are running; "
                          "launch with torchrun --nproc_per_node=DP")
    total, per_device = config.total_train_batch_size, config.per_device_train_batch_size
    if total is None:
        return dataclasses.replace(config, per_device_train_batch_size=per_device or 8)
    if total % world_size:
        raise ConfigError(f"total_train_batch_size: {total} samples do not divide evenly over {world_size} processes")
    if per_device is not None and per_device * world_size != total:
        raise ConfigError(f"total_train_batch_size ({total}) and per_device_train_batch_size ({per_device}) disagree: "
                          f"{world_size} process(es) x {per_device} = {per_device * world_size}; set only one of them")
    return dataclasses.replace(config, per_device_train_batch_size=total // world_size)


CPU_FORWARD_TOKENS = 1024  # CPU matmul throughput is flat from here up (measured), so smaller passes only save memory


def forward_token_limit(config: Config, device_type: str) -> int:
    """Positions per forward/backward pass (0: the whole micro-batch at once); see max_forward_tokens."""
    if config.max_forward_tokens is not None:
        return config.max_forward_tokens
    return CPU_FORWARD_TOKENS if device_type == "cpu" else 0


def check_metric_name(config: Config, metrics: list[str]) -> None:
    """metric_for_best_model names a metric this run's evaluators measure (checked before the first step)."""
    if config.metric_for_best_model not in metrics:
        raise ConfigError(f"metric_for_best_model: {brief(config.metric_for_best_model)} is not a metric of this run; "
                          f"choose from {', '.join(metrics)}")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def describe(config: Config) -> str:
    """The resolved config as YAML, grouped by section, with each field's help as a comment."""
    lines: list[str] = []
    section = None
    for name, f in fields().items():
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines.append(f"\n# --- {section} ---")
        rendered = yaml.safe_dump({name: getattr(config, name)}, default_flow_style=True, width=10_000).strip()
        if rendered.startswith("{") and rendered.endswith("}"):
            rendered = rendered[1:-1]
        valid = f" (range: {f.metadata['range']})" if f.metadata["range"] else ""
        lines.append(f"{rendered:<60} # {f.metadata['help']}{valid}")
    return "\n".join(lines).lstrip() + "\n"
