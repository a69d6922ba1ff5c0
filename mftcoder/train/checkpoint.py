"""Checkpoints: atomic save (temporary folder, then rename), retention, and everything resume needs."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mftcoder.config import ConfigError
from mftcoder.train.distributed import DistEnv, Parallelism
from mftcoder.train.manifest import has_manifest, manifest_problems, write_manifest

STATE_FILE = "trainer_state.json"
RESUME_DIR = "resume"
EXACT_WEIGHTS = "weights"  # RESUME_DIR/weights: the training weights, kept where save_dtype is narrower
STEP_NAME = re.compile(r"^checkpoint-(\d+)$")
EPOCH_NAME = re.compile(r"^checkpoint-epoch-(\d+)$")
# Settings a resumed run must share with the run that wrote the checkpoint, or the data order changes
# (num_train_epochs and max_steps may grow: that trains on, with the schedule stretched to the new end).
RESUME_MUST_MATCH = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps", "seq_length",
                     "data_split", "data_weights", "over_length", "chat_template", "padding_mode")
# Settings that define the model a checkpoint trains: a resume with others would load it into another model.
RESUME_SAME_MODEL = ("pretrained_model_path", "model_config", "model_type", "peft_type", "lora_rank", "lora_alpha",
                     "target_modules", "quantization")
RESUME_FREE = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir")  # not worth a note when they change


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer updates done in the current epoch
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    last_eval: dict | None = None  # {"step": int, "metric": float}
    checkpoint_metrics: dict[str, float] = field(default_factory=dict)  # checkpoint name -> its eval metric
    metrics_bytes: int | None = None  # length of metrics.jsonl at save time: resume cuts what came after
    balancer: dict = field(default_factory=dict)  # the task balancer's state (histories, current weights)
    validation_stream: dict = field(default_factory=dict)  # where the balancer's validation samples stand

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "TrainerState":
        return TrainerState(**json.loads(text))


def is_complete(path: Path) -> bool:
    """A checkpoint counts only under its final name and with its state file, which is written last."""
    return (STEP_NAME.match(path.name) or EPOCH_NAME.match(path.name)) is not None and (path / STATE_FILE).is_file()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message says where and why."""


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at (its name says so for step checkpoints; -1 if it cannot be told)."""
    if match := STEP_NAME.match(path.name):
        return int(match.group(1))
    try:
        return read_state(path).step
    except (OSError, ValueError, TypeError):
        return -1


def find_latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (highest step; a step checkpoint wins a tie with an epoch one)."""
    if not output_dir.is_dir():
        return None
    complete = [p for p in output_dir.iterdir() if p.is_dir() and is_complete(p)]
    if not complete:
        return None
    return max(complete, key=lambda p: (checkpoint_step(p), STEP_NAME.match(p.name) is not None))


def save_checkpoint(output_dir: Path, name: str, model: torch.nn.Module, runner: torch.nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer, state: TrainerState, run_files: dict[str, dict],
                    parallel: Parallelism, save_dtype: torch.dtype | None = None) -> Path:
    """Write checkpoint `name` atomically; every rank calls this. Everything goes to a hidden temporary
    folder (the user's model as an HF directory in `save_dtype` or PEFT adapter, the tokenizer, optimizer, RNG
    and the `run_files` resume checks read), the state file last, then one rename by the main process makes it
    visible. A crash before the rename leaves nothing that resume would pick; a checkpoint being replaced
    is set aside first and removed only once its replacement is in place."""
    env = parallel.env
    final, tmp = output_dir / name, output_dir / f".{name}.tmp"
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RESUME_DIR).mkdir(parents=True)
        env.barrier()
        full_state = parallel.full_model_state(runner)  # a collective under FSDP
        if env.is_main:
            save_model(model, tmp, full_state, save_dtype)
            tokenizer.save_pretrained(tmp)
        parallel.save_optimizer(runner, optimizer, tmp / RESUME_DIR)
        write_resume_state(tmp / RESUME_DIR, env.rank, run_files if env.is_main else None)
        env.barrier()
        if env.is_main:
            (tmp / STATE_FILE).write_text(state.to_json())
            write_manifest(tmp)  # last: a checkpoint is trusted only as far as this records
    except Exception as exc:
        raise _save_failed(exc, name, output_dir, tmp) from exc
    if env.is_main:
        old = output_dir / f".{name}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    env.barrier()
    return final


def _save_failed(exc: Exception, name: str, output_dir: Path, tmp: Path) -> Exception:
    """Remove the partial checkpoint; a full disk becomes a CheckpointError that says so (torch's and
    safetensors' writers report it in their own words, so a nearly empty disk is taken as the cause)."""
    written = _folder_bytes(tmp) if tmp.is_dir() else 0
    free = shutil.disk_usage(output_dir).free
    shutil.rmtree(tmp, ignore_errors=True)
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (no_space or free < _NEARLY_FULL):
        return exc
    previous = find_latest(output_dir)
    size = (f"the previous checkpoint, {previous.name}, takes {_gib(_folder_bytes(previous))}" if previous else
            f"{_gib(written)} were written before the disk filled")
    return CheckpointError(f"disk full: saving {name} in {output_dir} failed with {_gib(free)} free; {size}. "
                           "The partial checkpoint was removed and earlier ones are intact: free space (or lower "
                           "save_total_limit) and resume with resume_from_checkpoint: auto")


_NEARLY_FULL = 16 * 1024 * 1024


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**28 else f"{num_bytes / 2**20:.1f} MiB"


def checkpoint_problems(path: Path) -> list[str]:
    """Why a checkpoint cannot be trusted for resume (empty: it can): files missing, truncated or altered against
    its manifest; for one written before manifests existed, the files resume needs that are missing."""
    if not path.is_dir():
        return ["no such folder"]
    if not (path / STATE_FILE).is_file() and not has_manifest(path):
        return [f"not a checkpoint (no {STATE_FILE})"]
    if has_manifest(path):
        problems = manifest_problems(path)
    else:
        needed = [STATE_FILE, f"{RESUME_DIR}/config.json", f"{RESUME_DIR}/layout.json", f"{RESUME_DIR}/rng-0.pt"]
        problems = [f"{name} is missing" for name in needed if not (path / name).is_file()]
        if not ((path / RESUME_DIR / "optimizer.pt").is_file() or (path / RESUME_DIR / "optimizer").is_dir()):
            problems.append(f"{RESUME_DIR}/optimizer.pt is missing")
        if not any((path / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors",
                                                   "model.safetensors.index.json")):
            problems.append("the model weights (model.safetensors or adapter_model.safetensors) are missing")
    if not problems:
        try:
            read_state(path)
        except (ValueError, TypeError) as exc:
            problems.append(f"{STATE_FILE} cannot be read ({exc})")
    return problems


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of resume's way (never delete it): checkpoint-8 -> checkpoint-8.corrupt."""
    target, k = path.with_name(f"{path.name}.corrupt"), 2
    while target.exists():
        target, k = path.with_name(f"{path.name}.corrupt-{k}"), k + 1
    os.rename(path, target)
    return target


def resume_checkpoint(target: str | None, output_dir: Path, env: DistEnv, warn) -> Path | None:
    """The checkpoint to resume from, verified by the main process. 'auto': the newest one that verifies; a
    damaged newer one is set aside with a warning. An explicit path must verify, else a ConfigError says why."""
    if not target:
        return None
    if target != "auto":
        path = Path(target)
        if env.is_main and (problems := checkpoint_problems(path)):
            raise ConfigError(f"resume_from_checkpoint: {path} cannot be resumed from: {'; '.join(problems[:3])}")
        return path
    if env.is_main:
        while (latest := find_latest(output_dir)) is not None and (problems := checkpoint_problems(latest)):
            moved = set_aside(latest)
            warn(f"warning: checkpoint {latest} is damaged ({'; '.join(problems[:3])}); set aside as {moved.name}, "
                 "falling back to the previous checkpoint")
        if latest is not None and not has_manifest(latest):
            warn(f"note: {latest} has no manifest (written by an older mftcoder): its files are present but were "
                 "not checksummed")
    env.barrier()  # the others look once the main process has set damaged checkpoints aside
    latest = find_latest(output_dir)
    if latest is None and env.is_main:
        warn(f"resume_from_checkpoint=auto: no checkpoint in {output_dir}; starting fresh")
    return latest


def check_resume(checkpoint: Path, config: dict, layout: dict, say=None) -> None:
    """Refuse a resume that could not continue exactly (settings that change the data order, another number of
    processes, other data) or would train another model; say which other settings changed (the new values are used)."""
    saved = read_run_config(checkpoint)
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != config[key]:
            raise ConfigError(f"{key}: the checkpoint {checkpoint} was trained with {saved[key]!r}, this run has "
                              f"{config[key]!r}; an exact resume needs the same value")
    for key in RESUME_SAME_MODEL:
        if key in saved and saved[key] != config[key]:
            raise ConfigError(f"{key}: the checkpoint {checkpoint} trained a model with {saved[key]!r}, this run asks "
                              f"for {config[key]!r}; a resume continues the checkpoint's model: set {key} back, or "
                              "start a new run (in another output_dir) from the checkpoint's weights")
    changed = [f"{key} {saved[key]!r} -> {config[key]!r}" for key in sorted(saved)
               if key in config and saved[key] != config[key] and key not in RESUME_FREE]
    if changed and say:
        say(f"note: resuming from {checkpoint} with changed settings (the new values are used): {'; '.join(changed)}")
    check_layout(checkpoint, layout)


def resumed_padding_mode(checkpoint: Path, decided: str, say=None) -> str:
    """The batch layout a resumed run uses: the one the checkpoint recorded (padding_mode auto is decided at start-up,
    and another kernel, dtype or device may decide otherwise, which would change the data order). A checkpoint that
    packed, resumed where packing would let samples see each other, is refused."""
    path = checkpoint / RESUME_DIR / "layout.json"
    recorded = json.loads(path.read_text()).get("padding_mode") if path.is_file() else None
    if recorded is None or recorded == decided:  # (checkpoints from before this was recorded: as decided)
        return decided
    if recorded == "pack":
        raise ConfigError(f"padding_mode: {checkpoint} was trained with packed rows, and packing is not safe here (the "
                          f"start-up check chose {decided!r}: another attention kernel, dtype or device?); resume with "
                          "the settings it was trained with, or start a new run")
    if say:
        say(f"note: padding_mode: the start-up check would choose {decided!r} here, but {checkpoint} was trained with "
            f"{recorded!r}; continuing with {recorded!r} so that the data order stays the same")
    return recorded


def save_model(model: torch.nn.Module, directory: Path, state: dict | None, dtype: torch.dtype | None) -> None:
    """The user's model into a checkpoint: a LoRA adapter as trained (float32), or the full model as an HF
    directory in `dtype`. `state`: the gathered weights under FSDP (a copy), else None (the model's own). Where
    `dtype` is narrower than the training weights, RESUME_DIR/weights keeps them exactly, for an exact resume."""
    if hasattr(model, "get_base_model") or dtype is None:
        model.save_pretrained(directory, state_dict=state) if state is not None else model.save_pretrained(directory)
        adapter = directory / "adapter_model.safetensors"
        if adapter.is_file() and not _tensor_names(adapter):  # PEFT finds the adapter by module names
            raise RuntimeError(f"the LoRA adapter saved to {adapter} is empty: PEFT found no adapter weights under the "
                               "model's module names (a wrapper renamed them)")
        return
    state = state if state is not None else model.state_dict()
    if any(t.is_floating_point() and t.dtype != dtype for t in state.values()) and dtype != torch.float32:
        model.save_pretrained(directory / RESUME_DIR / EXACT_WEIGHTS, state_dict=dict(state))
    save_weights(model, directory, state, dtype)


def _tensor_names(path: Path) -> list[str]:
    with safe_open(path, "pt") as reader:
        return list(reader.keys())


def save_weights(model: torch.nn.Module, directory: Path, state: dict | None, dtype: torch.dtype) -> None:
    """An HF model directory whose weights (and config.json `dtype`) are in `dtype`. Only the saved copy is cast,
    tensor by tensor, never the training weights: a gathered `state` (FSDP) is cast in place, so no second copy
    builds up; the model's own weights (`state` None) are cast into a new dict (float32 -> bf16: +50% at save)."""
    if state is None:
        state = dict(model.state_dict())
    cast: dict[tuple, torch.Tensor] = {}  # tied weights stay one tensor, so safetensors still sees them as tied
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ident not in cast:
                cast[ident] = tensor.to(dtype)
            state[key] = cast[ident]
    model.save_pretrained(directory, state_dict=state)
    config_file = directory / "config.json"
    stated = json.loads(config_file.read_text())
    stated["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained writes the training weights' dtype
    config_file.write_text(json.dumps(stated, indent=2, sort_keys=True) + "\n")


def save_random_base(model: torch.nn.Module, tokenizer, directory: Path, dtype: torch.dtype, resuming: bool) -> None:
    """A LoRA run on a random-initialised model keeps its base on disk (in save_dtype), so the adapter can be
    merged later. A fresh start writes its own (one left by a run killed before its first checkpoint is replaced);
    a resumed run keeps the one its adapter was trained on."""
    if resuming and directory.exists():
        return
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, None, dtype)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def model_weights(checkpoint: Path) -> Path:
    """Where a full checkpoint's exact training weights are: RESUME_DIR/weights when the model files were saved
    in a narrower dtype, else the checkpoint itself."""
    exact = checkpoint / RESUME_DIR / EXACT_WEIGHTS
    return exact if (exact / "config.json").is_file() else checkpoint


def write_resume_state(directory: Path, rank: int, run_files: dict[str, dict] | None) -> None:
    """This rank's RNG state, and (main process) the run's config and layout for the resume checks."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / f"rng-{rank}.pt")
    for filename, content in (run_files or {}).items():
        (directory / filename).write_text(json.dumps(content, indent=1))


def read_run_config(checkpoint: Path) -> dict:
    path = checkpoint / RESUME_DIR / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_layout(checkpoint: Path, current: dict) -> None:
    """Refuse a resume that could not continue exactly: another number of processes, or other data."""
    path = checkpoint / RESUME_DIR / "layout.json"
    if not path.is_file():
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} has no {RESUME_DIR}/layout.json (the number of "
                          "processes and the data it was trained with), so an exact resume cannot be checked")
    saved = json.loads(path.read_text())
    if saved["world_size"] != current["world_size"]:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was written by {saved['world_size']} process(es) and "
                          f"this run has {current['world_size']}; each process has its own share of the data and its "
                          "own random state, so resume with the same number")
    if list(saved["data"]) != list(current["data"]):
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was trained on tasks {list(saved['data'])}, this run "
                          f"has {list(current['data'])}; an exact resume needs the same tasks in the same order")
    changed = [task for task, digest in saved["data"].items() if current["data"][task] != digest]
    if changed:
        raise ConfigError(f"resume_from_checkpoint: the data of task(s) {', '.join(changed)} changed since {checkpoint} "
                          "was written (other records, or another tokenizer); an exact resume needs the same data")


def is_adapter(checkpoint: Path) -> bool:
    return (checkpoint / "adapter_model.safetensors").is_file()


def load_adapter(checkpoint: Path, model: torch.nn.Module) -> None:
    """Put a LoRA checkpoint's adapter weights into the (not yet wrapped) PEFT model."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{checkpoint}: adapter keys do not match the model: {result.unexpected_keys[:3]}")


def restore_training_state(checkpoint: Path, runner: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           parallel: Parallelism) -> TrainerState:
    """Restore the optimizer, this rank's RNG and the trainer state (weights were loaded with the model)."""
    parallel.load_optimizer(runner, optimizer, checkpoint / RESUME_DIR)
    rng_file = checkpoint / RESUME_DIR / f"rng-{parallel.env.rank}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} has no RNG state for rank {parallel.env.rank} "
                          f"({rng_file.relative_to(checkpoint)} is missing); the checkpoint is incomplete")
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(checkpoint)


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState.from_json((checkpoint / STATE_FILE).read_text())


def apply_retention(output_dir: Path, limit: int | None, best: str | None) -> list[str]:
    """Delete step checkpoints beyond `limit`, keeping the best and then the newest; epoch checkpoints stay.
    With limit 1 and a best that is not the newest, both stay (the newest is what resume needs)."""
    if limit is None:
        return []
    steps = sorted((p for p in output_dir.iterdir() if p.is_dir() and STEP_NAME.match(p.name) and is_complete(p)),
                   key=lambda p: int(STEP_NAME.match(p.name).group(1)), reverse=True)
    keep = {steps[0].name} if steps else set()
    if best:
        keep.add(best)
    for path in steps:
        if len(keep) >= limit:
            break
        keep.add(path.name)
    removed = [p.name for p in steps if p.name not in keep]
    for name in removed:
        shutil.rmtree(output_dir / name)
    return removed


def remove_incomplete(output_dir: Path) -> None:
    """Clear temporary folders left by a save that crashed; a checkpoint set aside for a replacement that never
    arrived is put back."""
    if output_dir.is_dir():
        for path in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
        for path in output_dir.glob(".checkpoint-*.old"):
            final = output_dir / path.name[1:-len(".old")]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, final)
