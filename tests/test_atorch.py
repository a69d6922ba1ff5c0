"""distributed_strategy: atorch (ATorch's auto_accelerate) on CPU, 2 ranks under torchrun with gloo: parallel_mode and
zero1 train like one process, resume is exact, checkpoints move between engines; and the safetensors stand-in
ATorch needs gives the bytes safetensors writes."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save

from mftcoder.atorch_strategy import parse_strategy
from mftcoder.config import ConfigError, build_config
from mftcoder.train.atorch_engine import check_strategy, default_strategy, load_strategy, tensor_bytes
from mftcoder.train.loop import train
from test_distributed import final_weights, run_two_ranks, settings, train_losses


def _atorch_installed() -> bool:
    try:
        import atorch  # noqa: F401
    except ImportError:
        return False
    return True


# scripts/test.sh installs ATorch and sets MFTCODER_REQUIRE_ATORCH=1, so that in CI these tests run or fail, never skip.
needs_atorch = pytest.mark.skipif(not _atorch_installed() and os.environ.get("MFTCODER_REQUIRE_ATORCH") != "1",
                                  reason="ATorch is not installed (bash scripts/setup.sh atorch)")

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.uint16, torch.uint32, torch.uint64]


def sample_tensor(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    values = torch.linspace(-3.7, 9.1, int(torch.tensor(shape).prod())).reshape(shape)
    if dtype == torch.complex64:
        return torch.complex(values, -values)
    if dtype == torch.bool:
        return values > 1
    if not dtype.is_floating_point:
        values = values.abs() * 7 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else values * 7
    return values.to(dtype)


def safetensors_data(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Each tensor's data bytes as safetensors itself serializes them (its header's offsets into the data)."""
    blob = save(tensors)
    length = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + length]), blob[8 + length:]
    return {name: data[meta["data_offsets"][0]:meta["data_offsets"][1]] for name, meta in header.items()
            if name != "__metadata__"}


def test_tensor_bytes_are_what_safetensors_writes_for_every_dtype():
    tensors = {str(dtype): sample_tensor(dtype) for dtype in ALL_DTYPES}
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors.update({"scalar": torch.tensor(2.5), "row_slice": base[1:3], "parameter": torch.nn.Parameter(base.clone())})
    expected = safetensors_data({k: v.detach() for k, v in tensors.items()})
    for name, tensor in tensors.items():
        assert tensor_bytes(tensor, name) == expected[name], name
    assert tensor_bytes(torch.tensor([1.0, -2.0]), "x") == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"  # little-endian IEEE
    assert tensor_bytes(torch.tensor([1.0], dtype=torch.bfloat16), "x") == b"\x80\x3f"
    assert tensor_bytes(base[2:], "x") == struct.pack("<12f", *range(12, 24))  # a slice: its own elements only
    assert tensor_bytes(torch.zeros(0, 4), "x") == tensor_bytes(base[4:], "x") == b""
    with pytest.raises(ValueError, match="non contiguous tensor: `t`"):
        tensor_bytes(base.t(), "t")
    with pytest.raises(ValueError, match="sparse tensor: `s`"):
        tensor_bytes(base.to_sparse(), "s")


@needs_atorch
def test_atorchs_flat_checkpoint_writer_reads_back_exactly(tmp_path):
    from mftcoder.train.atorch_engine import import_auto_accelerate

    import_auto_accelerate()  # puts the stand-in in place where safetensors 0.8 lacks _tobytes
    from atorch.utils.fsdp_save_util import safetensors_dump

    tensors = {f"t{i}": sample_tensor(dtype, (2, 3 + i)) for i, dtype in enumerate(ALL_DTYPES[:11])}
    tensors["empty"] = torch.zeros(0, 3)
    safetensors_dump(tensors, tmp_path / "flat.safetensors")
    loaded = load_file(tmp_path / "flat.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_strategy_entries_are_checked_with_reasons():
    assert parse_strategy(["parallel_mode", ["checkpoint", ["GPTNeoXLayer"]], ["zero1"]]) == [
        ("parallel_mode", None), ("checkpoint", ["GPTNeoXLayer"]), ("zero1", None)]
    cases = {
        ("paralel_mode",): "unknown strategy 'paralel_mode'; did you mean 'parallel_mode'",
        ("parallel_mode", "fp8"): "'fp8' is an ATorch strategy mftcoder does not run",
        ("parallel_mode", "fsdp"): "'fsdp' needs a GPU: ATorch's fsdp refuses CPU",
        ("parallel_mode", "zero2"): "'zero2' needs a GPU: on CPU ATorch's zero2 is fairscale's ShardedDataParallel",
        ("zero1",): "has no data-parallel entry, so the 2 processes would train apart",
    }
    for entries, message in cases.items():
        with pytest.raises(ConfigError, match="^atorch_strategy" + ".*" + message.replace("(", r"\(")):
            check_strategy(list(entries), "cpu", 2, checkpoint_activations=False)
    with pytest.raises(ConfigError, match="^generation_eval: .*ATorch's 'fsdp' shards with FSDP \\(1\\)"):
        check_strategy(["parallel_mode", "fsdp"], "cuda", 2, generation_eval=True)
    with pytest.raises(ConfigError, match="amp_native in float16 needs a loss scaler"):
        check_strategy(["parallel_mode", "amp_native"], "cuda", 2, checkpoint_activations=False)
    check_strategy(["parallel_mode", ["amp_native", {"dtype": "bf16"}], "fsdp"], "cuda", 2, False)  # fine on a GPU
    with pytest.raises(ConfigError, match="^checkpoint_activations: true and atorch_strategy 'checkpoint'"):
        check_strategy(["parallel_mode", "checkpoint"], "cpu", 2, checkpoint_activations=True)
    with pytest.raises(ConfigError, match=r"^atorch_strategy\[1\]: expected a name or \[name, config\], got 3"):
        build_config({"distributed_strategy": "atorch", "atorch_strategy": ["parallel_mode", 3]})
    with pytest.raises(ConfigError, match="^atorch_strategy: read only with distributed_strategy: atorch"):
        build_config({"atorch_strategy": ["parallel_mode"]})
    config = build_config({"distributed_strategy": "atorch",
                           "atorch_strategy": "[parallel_mode, [checkpoint, {no_reentrant: false}]]"})[0]
    assert config.atorch_strategy == ["parallel_mode", ["checkpoint", {"no_reentrant": False}]]


def test_default_strategies_per_device_pass_their_own_checks():
    bf16 = ["amp_native", {"dtype": "bf16"}]
    assert default_strategy("cpu", lora=False, checkpoint_activations=False) == ["parallel_mode"]
    assert default_strategy("cuda", lora=False, checkpoint_activations=False) == ["parallel_mode", "fsdp", bf16,
                                                                                  "checkpoint"]
    assert default_strategy("cuda", lora=False, checkpoint_activations=True) == ["parallel_mode", "fsdp", bf16]
    assert default_strategy("cuda", lora=True, checkpoint_activations=False) == ["parallel_mode", bf16]
    for device in ("cpu", "cuda"):
        for lora in (False, True):
            for recompute in (False, True):
                check_strategy(default_strategy(device, lora, recompute), device, 2, recompute, lora)


def test_layer_classes_are_found_by_name_and_checkpointing_is_non_reentrant_by_default():
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXMLP

    from mftcoder.model import read_model_config

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("tiny-test")))
    assert load_strategy(["parallel_mode", "checkpoint"], model) == [
        "parallel_mode", ("checkpoint", {"wrap_class": (GPTNeoXLayer,), "no_reentrant": True})]
    assert load_strategy([["checkpoint", ["GPTNeoXMLP"]]], model) == [
        ("checkpoint", {"wrap_class": (GPTNeoXMLP,), "no_reentrant": True})]
    assert load_strategy([["checkpoint", {"wrap_class": "GPTNeoXMLP"}]], model) == [
        ("checkpoint", {"wrap_class": (GPTNeoXMLP,), "no_reentrant": True})]
    assert load_strategy([["checkpoint", {"no_reentrant": False}]], model) == [
        ("checkpoint", {"wrap_class": (GPTNeoXLayer,), "no_reentrant": False})]
    fsdp = load_strategy(["fsdp", ["amp_native", {"dtype": "bf16"}]], model)
    assert fsdp[0] == ("fsdp", {"sync_module_states": True, "use_orig_params": True, "limit_all_gathers": True,
                                "atorch_wrap_cls": (GPTNeoXLayer,)})
    assert fsdp[1] == ("amp_native", {"dtype": torch.bfloat16})
    with pytest.raises(ConfigError, match="no module class 'LlamaDecoderLayer' in GPTNeoXForCausalLM "
                                          r"\(decoder layers: GPTNeoXLayer\)"):
        load_strategy([["checkpoint", ["LlamaDecoderLayer"]]], model)


@needs_atorch
@pytest.mark.parametrize("strategy", [["parallel_mode"], ["parallel_mode", "zero1", "checkpoint"]],
                         ids=["parallel_mode", "zero1+checkpoint"])
def test_two_atorch_ranks_of_four_equal_one_process_of_eight(small_tasks, tmp_path, strategy):
    # ("checkpoint": ATorch's activation checkpointing, non-reentrant by default here; its reentrant form with a
    # layer cache left on was measured to lose most of the attention's gradients, a 4e-3 weight difference.)
    common = dict(weighted_loss_mode="case3", adam_epsilon=1e-5, learning_rate=1e-3)  # as the DDP test
    single = train(build_config(settings(small_tasks, tmp_path / "one", per_device_train_batch_size=8, **common))[0])
    done = run_two_ranks(settings(small_tasks, tmp_path / "two", total_train_batch_size=8,
                                  distributed_strategy="atorch", atorch_strategy=strategy, **common))
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Acceleration strategy has {len(strategy)} optimization methods" in done.stdout + done.stderr
    one, two = final_weights(tmp_path / "one", 3), final_weights(tmp_path / "two", 3)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-6), (key, (one[key] - two[key]).abs().max())
    assert train_losses(tmp_path / "two") == pytest.approx(single.step_losses, rel=1e-5)


@needs_atorch
def test_resume_under_atorch_is_exact_and_checkpoints_move_between_engines(small_tasks, tmp_path):
    """4 steps under atorch (zero1) and under ddp train bitwise alike; an atorch checkpoint resumed under ddp and a
    ddp one resumed under atorch (zero1 loading the whole AdamW state) both reproduce the last 2 steps bitwise."""
    engines = {"atorch": dict(distributed_strategy="atorch", atorch_strategy=["parallel_mode", "zero1"]),
               "ddp": dict(distributed_strategy="ddp")}
    values = dict(per_device_train_batch_size=2, max_steps=4, checkpointing_steps=2, evaluation_steps=2)
    for name, engine in engines.items():
        done = run_two_ranks(settings(small_tasks, tmp_path / f"full-{name}", **values, **engine))
        assert done.returncode == 0, done.stderr[-4000:]
    expected = final_weights(tmp_path / "full-atorch", 4)
    assert train_losses(tmp_path / "full-ddp") == train_losses(tmp_path / "full-atorch")
    assert all(torch.equal(expected[k], final_weights(tmp_path / "full-ddp", 4)[k]) for k in expected)
    for first, then in (("atorch", "ddp"), ("ddp", "atorch")):
        resumed = tmp_path / f"{first}-then-{then}"
        shutil.copytree(tmp_path / f"full-{first}" / "checkpoint-2", resumed / "checkpoint-2")
        done = run_two_ranks(settings(small_tasks, resumed, resume_from_checkpoint="auto", **values, **engines[then]))
        assert done.returncode == 0, done.stderr[-4000:]
        assert train_losses(resumed) == train_losses(tmp_path / f"full-{first}")[2:], (first, then)
        weights = final_weights(resumed, 4)
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    # zero1's sharded optimizer state is saved whole, as a plain AdamW's: one file, every parameter's moments
    state = torch.load(tmp_path / "full-atorch" / "checkpoint-4" / "resume" / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == len(expected) and all(s["step"] == 4 for s in state["state"].values())


def test_module_wrapping_strategies_are_refused_for_lora_and_an_empty_adapter_is_never_saved(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from mftcoder.model import load_base_model, load_tokenizer, prepare_for_training
    from mftcoder.train.checkpoint import save_model

    with pytest.raises(ConfigError, match="'checkpoint' with peft_type: lora: .*use checkpoint_activations: true"):
        check_strategy(["parallel_mode", "checkpoint"], "cpu", 2, lora=True)
    # What ATorch's checkpoint does to a layer, done by hand: PEFT's saving then finds no adapter, and mftcoder says so.
    config = build_config({"model_config": "tiny-test", "peft_type": "lora"})[0]
    tokenizer, template = load_tokenizer(config)
    model = prepare_for_training(load_base_model(config, tokenizer, template), config)
    layers = model.get_base_model().gpt_neox.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)
    with pytest.raises(RuntimeError, match="adapter_model.safetensors is empty: PEFT found no adapter weights"):
        save_model(model, tmp_path, None, None)


def test_gathered_weights_are_named_as_the_users_model_whatever_wraps_the_runner():
    """ATorch on a GPU wraps the runner in FSDP (1) and more; the saved names must be the model's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mftcoder.loss import SupervisedLM
    from mftcoder.train.distributed import gathered_model_state, user_model_key

    assert user_model_key("_fsdp_wrapped_module.module.model.model.layers.0.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert user_model_key("model.gpt_neox.embed_in.weight") == "gpt_neox.embed_in.weight"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=64, hidden_size=16,
                                                                  intermediate_size=32, num_hidden_layers=1,
                                                                  num_attention_heads=2))
    wrapped = torch.nn.ModuleDict({"module": SupervisedLM(model)})  # a wrapper's extra level of names
    state = gathered_model_state(wrapped)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
