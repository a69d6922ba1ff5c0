"""The config schema: the reference's names, typo hints, both data_paths forms, overrides, validation."""

from __future__ import annotations

import pytest

from mftcoder.cli import main
from mftcoder.config import ConfigError, build_config, fields, load_config, resolve_for_world, split_fractions

# Every argument the reference document names (section 3.4), plus those its launch scripts pass.
REFERENCE_DOC_VALUES = {
    "tokenize_mode": "sft", "train_mode": "sft", "load_raw_dataset": True, "data_paths": "[a,b]",
    "output_dir": "out", "tensorboard_dir": "tb", "model_type": "gpt_neox", "peft_type": "lora",
    "pretrained_model_path": "model", "total_train_batch_size": 16, "per_device_valid_batch_size": 4,
    "gradient_accumulation_steps": 2, "checkpoint_activations": True, "learning_rate": 1e-4, "min_lr": 1e-5,
    "seq_length": 4096, "log_interval": 10, "checkpointing_steps": 2000, "evalation_steps": 300,
    "early_stopping_patience": 10, "lr_scheduler_type": "cosine", "num_warmup_steps": 500, "seed": 42,
    "train_iters": 10, "valid_iters": 10, "evaluation_strategy": "steps,epoch", "save_strategy": "steps",
    "extra_save_by_epoch": True, "save_total_limit": 2, "weighted_loss_mode": "case3",
}
REFERENCE_LAUNCHER_VALUES = {
    "data_weights": "[1.,1.]", "data_split": "95,5,0", "padding_mode": "padding", "vocab_file": "tok",
    "custom_lr_scheduler_type": "cosine", "valid_interval": 2000, "num_train_epochs": 5,
    "per_device_train_batch_size": 8, "preprocessing_num_workers": 6, "num_workers": 8, "tp": 1, "dp": 2,
    "bf16": True, "max_grad_norm": 1, "metric_for_best_model": "loss", "greater_is_better": "false",
    "resume_from_checkpoint": "false", "shuffle_before_split": True,
}


def test_every_reference_argument_is_accepted_with_its_meaning():
    config, notices = build_config({**REFERENCE_DOC_VALUES, **REFERENCE_LAUNCHER_VALUES})
    assert config.data_paths == ["a", "b"]
    assert config.evaluation_steps == 2000  # valid_interval came after evalation_steps
    assert config.tokenizer_path == "tok" and config.lr_scheduler_type == "cosine"
    assert config.data_weights == [1.0, 1.0] and config.greater_is_better is False
    assert config.resume_from_checkpoint is None and config.max_grad_norm == 1.0
    assert config.checkpoint_activations is True and config.peft_type == "lora"
    assert len(notices) == 4 and any("train_iters" in n for n in notices)


def test_evalation_steps_alias():
    assert build_config({"evalation_steps": "300"})[0].evaluation_steps == 300


def test_data_paths_both_forms():
    assert build_config({"data_paths": "[x/a, x/b]"})[0].data_paths == ["x/a", "x/b"]
    assert build_config({"data_paths": '["x/a","x/b"]'})[0].data_paths == ["x/a", "x/b"]
    assert build_config({"data_paths": ["x/a", "x/b"]})[0].data_paths == ["x/a", "x/b"]


@pytest.mark.parametrize("key, hint", [("learning_rat", "learning_rate"), ("evaluation_step", "evaluation_steps"),
                                       ("data_path", "data_paths"), ("seq_lenght", "seq_length")])
def test_typo_names_the_closest_key(key, hint):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{hint}'"):
        build_config({key: 1})


@pytest.mark.parametrize("values, message", [
    ({"weighted_loss_mode": "case5"}, "weighted_loss_mode: 'case5' is not one of .*did you mean 'case4'"),
    ({"seq_length": "long"}, "seq_length: expected an integer, got 'long'"),
    ({"seq_length": 0}, "seq_length: 0 is out of range; expected at least 2"),
    ({"max_grad_norm": -1}, r"max_grad_norm: -1.0 is out of range; expected at least 0"),
    ({"max_steps": 0}, r"max_steps: 0 is out of range; expected at least 1, or -1 \(all epochs\)"),
    ({"data_weights": [0, 0, 0]}, "data_weights: every weight is 0, so no task would be sampled"),
    ({"data_weights": {"a": 0}}, "data_weights: every weight is 0"),
    ({"task_weights": [1, -2]}, r"task_weights\[1\]: -2.0 is out of range; expected at least 0"),
    ({"learning_rate": float("nan")}, "learning_rate: nan is out of range; expected above 0"),
    ({"adam_beta2": 1.0}, "adam_beta2: 1.0 is out of range; expected at least 0 and below 1"),
    ({"output_dir": ""}, "output_dir: empty; name a folder"),
    ({"data_paths": "[a,b"}, r"data_paths: malformed list '\[a,b' \(unbalanced brackets\)"),
    ({"learning_rate": "fast"}, "learning_rate: expected a number"),
    ({"checkpoint_activations": "maybe"}, "checkpoint_activations: expected true or false"),
    ({"tp": 2}, "tp: tensor parallelism is not supported"),
    ({"fp16": True}, "fp16: not supported"),
    ({"load_raw_dataset": False}, "load_raw_dataset: only raw JSONL"),
    ({"tokenize_mode": "pretrain"}, "tokenize_mode: 'pretrain' is not one of sft"),
    ({"data_split": "a,b"}, "data_split: expected numbers"),
    ({"min_lr": 1.0, "learning_rate": 0.1}, "min_lr .* is above learning_rate"),
    ({"pretrained_model_path": "m", "model_config": "tiny-test"}, "either pretrained_model_path .* or model_config"),
    ({"metric_for_best_model": "accuracy"}, "metric_for_best_model: expected 'loss'"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def _numeric_fields() -> dict[str, tuple]:
    """name -> (field, whether it holds integers) for every key whose type involves a number."""
    import typing

    from mftcoder.config import Config

    hints = typing.get_type_hints(Config)

    def kinds(tp) -> set:
        return {tp} & {int, float} | {k for arg in typing.get_args(tp) for k in kinds(arg)}

    return {name: (f, kinds(hints[name]) == {int}) for name, f in fields().items() if kinds(hints[name])}


def test_every_numeric_key_has_a_range_that_is_enforced():
    numeric = _numeric_fields()
    assert len(numeric) == 47 and {"max_grad_norm", "data_weights", "coba_tau", "generation_eval_timeout", "beta", "rpo_alpha"} <= set(numeric)
    defaults = build_config({})[0]
    for name, (f, integer) in numeric.items():
        valid, default = f.metadata["range"], getattr(defaults, name)
        assert valid is not None, name
        assert default in (None, [], {}) or default in valid, name  # every default is valid
        step = 1 if integer else 0.5
        outside = [valid.low if valid.low_open else valid.low - step] if valid.low is not None else []
        outside += [valid.high if valid.high_open else valid.high + step] if valid.high is not None else []
        outside += [] if integer else [float("inf"), float("nan")]
        assert outside or name == "train_iters", name  # only the ignored placeholder takes any integer
        for bad in outside:
            if bad in valid.special:
                continue
            with pytest.raises(ConfigError, match=f"^{name}(\\[0\\])?: "):
                build_config({name: [bad] if "list" in f.type else bad})


def test_special_values_and_config_show_lists_ranges(capsys):
    assert build_config({"max_steps": -1, "early_stopping_patience": -1, "max_grad_norm": 0})[0].max_grad_norm == 0
    assert build_config({"max_grad_norm": None, "data_weights": [0, 1]})[0].data_weights == [0.0, 1.0]
    assert main(["config", "show", "/dev/null"]) == 0
    assert "(range: at least 1, or -1 (all epochs))" in capsys.readouterr().out


def test_split_is_normalized():
    assert split_fractions("95,5,0") == (0.95, 0.05, 0.0)
    assert split_fractions("9,1") == (0.9, 0.1, 0.0)
    assert split_fractions("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))


def test_file_plus_overrides_and_relative_paths(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("data_paths: '[data/a,data/b]'\noutput_dir: out\nlearning_rate: 2e-5\nseq_length: 512\n")
    config, _ = load_config(path, ["seq_length=128", "learning_rate=1e-4", "output_dir=elsewhere"])
    assert config.data_paths == [str(tmp_path / "cfg" / "data" / "a"), str(tmp_path / "cfg" / "data" / "b")]
    assert (config.seq_length, config.learning_rate) == (128, 1e-4)
    assert config.output_dir == "elsewhere"  # command-line paths stay relative to the working directory


def test_json_config_and_bad_files(tmp_path):
    good = tmp_path / "c.json"
    good.write_text('{"seq_length": 99}')
    assert load_config(good)[0].seq_length == 99
    bad = tmp_path / "c.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["seq_length"])


def test_every_field_has_help_and_config_show_prints_it(capsys):
    assert all(f.metadata["help"] for f in fields().values())
    assert main(["config", "show", "/dev/null", "seq_length=77", "train_iters=5"]) == 0
    out = capsys.readouterr()
    assert "seq_length: 77" in out.out and "# Maximum tokens per sample" in out.out
    assert "train_iters is a placeholder" in out.err
    for name in fields():
        assert f"\n{name}: " in "\n" + out.out


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "show", "/dev/null", "lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'" in err and "Traceback" not in err


@pytest.mark.parametrize("values, world, per_device", [
    ({}, 1, 8), ({}, 4, 8), ({"per_device_train_batch_size": 3}, 2, 3),
    ({"total_train_batch_size": 8}, 1, 8), ({"total_train_batch_size": 8}, 2, 4), ({"total_train_batch_size": 8}, 8, 1),
    ({"total_train_batch_size": 8, "per_device_train_batch_size": 4}, 2, 4),  # both, and they agree
])
def test_total_train_batch_size_sets_the_per_process_batch(values, world, per_device):
    assert resolve_for_world(build_config(values)[0], world).per_device_train_batch_size == per_device


@pytest.mark.parametrize("values, world, message", [
    ({"total_train_batch_size": 8}, 3, "total_train_batch_size: 8 samples do not divide evenly over 3 processes"),
    ({"total_train_batch_size": 8, "per_device_train_batch_size": 8}, 2,
     r"total_train_batch_size \(8\) and per_device_train_batch_size \(8\) disagree: 2 process\(es\) x 8 = 16"),
    ({"dp": 2}, 1, "dp: set to 2 but 1 process"),
])
def test_batch_settings_that_cannot_hold_are_refused(values, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_for_world(build_config(values)[0], world)


BOMB = "task_weights: [&a [1,1,1,1,1,1,1,1,1], " + ", ".join(
    f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")) + "]\n"


@pytest.mark.parametrize("text, message", [
    (BOMB, "c.yaml:1: key 'task_weights' expands to more than 100,000 values (nested YAML aliases?); write the value out"),
    ("a: &x [1, *x]\n", "c.yaml:1: a YAML alias refers to a value that contains it (recursive)"),
    ("seq_length: 10\nlearning_rate: 1e-4\nseq_length: 20\n", "c.yaml:3: duplicate key 'seq_length' (first at line 1); keep one of them"),
    ("tasks:\n  a: x\n  b: y\n  a: z\n", "c.yaml:4: duplicate key 'a' (first at line 2); keep one of them"),
    ("seed: " + "9" * 5000 + "\n", "c.yaml: cannot read a value: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
    ("seed: 2001-13-45\n", "c.yaml: cannot read a value: month must be in 1..12"),
    ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "c.yaml:1: nested more than 50 levels deep"),
    ("a: [1,\n", "c.yaml:2: not valid YAML: expected the node content, but found '<stream end>'"),
    ('{"seq_length": 10,\n "seq_length": 20}', "c.json:2: duplicate key 'seq_length'; keep one of them"),
    ('{"seed": ' + "9" * 5000 + "}", "c.json: not valid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
    ('{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}", "c.json: not valid JSON: nested too deeply"),
    ('{"seed": 1,}', "c.json:1: not valid JSON: Expecting property name enclosed in double quotes (column 12)"),
])
def test_yaml_and_json_refused_before_they_are_built(tmp_path, text, message):
    path = tmp_path / message.split(":")[0]  # c.yaml or c.json
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{tmp_path}/{message}"


def test_alias_bomb_and_non_utf8_through_the_cli(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "latin1.yaml").write_bytes(b"seq_length: 10\n# caf\xe9\n")
    assert main(["config", "show", str(tmp_path / "bomb.yaml")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/bomb.yaml:1: key 'task_weights' expands to more than "
                                       "100,000 values (nested YAML aliases?); write the value out\n")
    assert main(["config", "show", str(tmp_path / "latin1.yaml")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/latin1.yaml:2: not UTF-8 text (byte 0xe9 at offset 20); "
                                       "save the config as UTF-8\n")


def test_error_messages_show_a_bounded_value():
    with pytest.raises(ConfigError) as caught:
        build_config({"seq_length": [list(range(1000))] * 1000})
    assert str(caught.value) == "seq_length: expected an integer, got [[0, 1, 2, 3, 4, 5, ...], [0, 1, 2, 3, 4, 5, ...], " \
                                "[0, 1, 2, 3, 4, 5, ...], [0, 1, 2, 3, 4, 5, ...], [0, 1, 2, 3, 4, 5, ...], [0, 1, 2, 3, 4, 5, ...], ...]"
    with pytest.raises(ConfigError) as caught:
        build_config({"x" * 100_000: 1})
    assert len(str(caught.value)) < 100


@pytest.mark.parametrize("overrides, message", [
    (["atorch_strategy=[a"], "atorch_strategy: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    (["tasks={a: x, a: y}"], "tasks: duplicate key 'a' (first at line 1); keep one of them"),
    (["output_dir=a\x00b"], "output_dir: a path holds a NUL character, which no file name can"),
])
def test_override_problems_are_sentences(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert str(caught.value) == message


@pytest.mark.parametrize("split", ["nan,1,1", "1,inf,0", "1e308,1e308", "-1,2,0", "1,-0.5"])
def test_data_split_must_be_finite_and_non_negative(split):
    with pytest.raises(ConfigError, match=r"^data_split: expected (finite numbers|up to three non-negative numbers)"):
        build_config({"data_split": split})


def test_a_split_without_validation_part_is_noted():
    _, notices = build_config({"data_split": "100,0,0"})
    assert notices == ["data_split '100,0,0' leaves no validation samples, so evaluation_strategy: steps never "
                       "evaluates (no validation loss, no best checkpoint); give data_split a validation share (e.g. "
                       "'95,5,0') or set evaluation_strategy: no"]
    assert build_config({"data_split": "100,0,0", "evaluation_strategy": "no"})[1] == []
    assert build_config({"data_split": "100,0,0", "generation_eval": ["humaneval"]})[1] == []


def test_seq_length_is_bounded():
    with pytest.raises(ConfigError) as caught:
        build_config({"seq_length": 1_000_000_000, "padding_mode": "padding"})
    assert str(caught.value) == "seq_length: 1000000000 is out of range; expected at least 2 and at most 16777216"


@pytest.mark.parametrize("name, problem", [
    ("/tmp/x", "is not a name: use letters, digits, '_', '.' and '-' only (no '/', spaces or other characters)"),
    ("../../x", "is not a name: use letters, digits, '_', '.' and '-' only (no '/', spaces or other characters)"),
    ("a b", "is not a name: use letters, digits, '_', '.' and '-' only (no '/', spaces or other characters)"),
    ("", "is not a name: use letters, digits, '_', '.' and '-' only (no '/', spaces or other characters)"),
    ("..", "starts with '.'; a task name may not (it would be a hidden or relative path)"),
    (".cache", "starts with '.'; a task name may not (it would be a hidden or relative path)"),
    ("t" * 101, "is 101 bytes long (UTF-8); a task name may have at most 100"),
])
def test_task_names_are_names(tmp_path, name, problem):
    with pytest.raises(ConfigError) as caught:
        build_config({"tasks": {name: str(tmp_path)}})
    assert str(caught.value) == f"tasks: task name {name if len(name) < 50 else 't' * 27 + '...' + 't' * 28!r} {problem}"


def test_good_task_names_pass():
    names = {"code_gen": "a", "unit-tests.v2": "b", "代码生成": "c", "T1": "d"}
    assert build_config({"tasks": names})[0].tasks == names


def test_seq_length_above_the_models_positions_is_warned(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox", "max_position_embeddings": 512}')
    assert main(["config", "show", "/dev/null", f"model_config={tmp_path / 'config.json'}", "seq_length=1024"]) == 0
    assert capsys.readouterr().err == (
        f"note: seq_length: 1024 is above the model's max_position_embeddings (512, in {tmp_path / 'config.json'}): "
        "positions past 512 were never trained (a model with learned position embeddings fails there); lower "
        "seq_length to 512 or extend the model's context (e.g. rope_scaling)\n")
    assert main(["config", "show", "/dev/null", f"model_config={tmp_path / 'config.json'}", "seq_length=512"]) == 0
    assert capsys.readouterr().err == ""


def test_a_nested_value_in_an_error_is_shown_bounded(tmp_path):
    nested = [[[list(range(9))] * 9] * 9] * 9
    with pytest.raises(ConfigError) as caught:
        build_config({"model_type": nested})
    message = str(caught.value)
    assert message.startswith("model_type: expected a string, got [[[[...], [...], [...], [...], [...], [...], ...], ")
    assert message.endswith("...") and len(message) == len("model_type: expected a string, got ") + 4 * 60 + 3
