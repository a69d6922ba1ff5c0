"""A model folder that cannot load is one sentence naming the setting that pointed at it, from every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mftcoder.cli import main
from mftcoder.config import ConfigError
from mftcoder.model import DEMO_DATA, SHIPPED_MODEL_CONFIGS, SHIPPED_TOKENIZER
from mftcoder.model_folder import check_model_folder


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "good"
    config = AutoConfig.for_model(**json.loads(SHIPPED_MODEL_CONFIGS["tiny-test"].read_text()))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="1MB")  # sharded
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder)
    return folder


def edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def cut(file: Path, size: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "missing": (lambda m: shutil.rmtree(m), "{m} does not exist"),
    "no config.json": (lambda m: (m / "config.json").unlink(), "{m} is not a Hugging Face model folder (no config.json)"),
    "config.json not JSON": (lambda m: (m / "config.json").write_bytes(b"{\xff"), "{m}/config.json cannot be read ("),
    "unknown model_type": (lambda m: edit_config(m, model_type="nosuchmodel"),
                           "{m}/config.json has model_type 'nosuchmodel', which transformers "),
    "needs remote code": (lambda m: edit_config(m, model_type="custom", auto_map={"AutoConfig": "x.XConfig"}),
                          "{m} needs its own Python code to load (config.json's auto_map names it; model_type 'custom'"),
    "a shard missing": (lambda m: first_shard(m).unlink(), "{m} lacks 1 of the "),
    "no weights": (lambda m: [p.unlink() for p in m.glob("model*.safetensors*")],
                   "{m} holds no model weights (none of model.safetensors, "),
    "header cut": (lambda m: cut(first_shard(m), 100), "{shard} is damaged or truncated (100 bytes; its header claims "),
    "data cut": (lambda m: cut(first_shard(m), first_shard(m).stat().st_size - 10),
                 "{shard} is truncated or damaged: it has "),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_an_unusable_model_folder_is_one_sentence(good, tmp_path, kind):
    damage, expected = DAMAGE[kind]
    model = tmp_path / "model"
    shutil.copytree(good, model)
    shard = first_shard(model)
    damage(model)
    with pytest.raises(ConfigError) as error:
        check_model_folder(model, "pretrained_model_path")
    assert str(error.value).startswith(f"pretrained_model_path: {expected.format(m=model, shard=shard)}"), error.value
    if kind == "needs remote code":
        assert check_model_folder(model, "pretrained_model_path", trust_remote_code=True)["model_type"] == "custom"


def test_every_command_names_its_own_setting(good, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(good, model)
    shard = first_shard(model)
    cut(shard, 100)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    commands = {
        "pretrained_model_path": ["train", "/dev/null", f"pretrained_model_path={model}", "max_steps=1",
                                  f"data_paths=[{json.dumps(str(DEMO_DATA / 'code_generation'))}]",
                                  f"output_dir={tmp_path / 'out'}", f"data_cache_dir={tmp_path / 'cache'}"],
        "--model": ["generate", "--model", str(model), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")],
        "--base": ["merge", "--base", str(model), "--adapter", str(good), "--out", str(tmp_path / "merged")],
    }
    for key, argv in commands.items():
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {key}: {shard} is damaged or truncated (100 bytes; "), err
    (tmp_path / "missing").mkdir()
    shutil.rmtree(tmp_path / "missing")
    assert main(["data", "check", "/dev/null", f"pretrained_model_path={tmp_path / 'missing'}",
                 f"data_paths=[{json.dumps(str(DEMO_DATA / 'code_generation'))}]"]) == 2
    assert capsys.readouterr().err.strip() == f"error: pretrained_model_path: {tmp_path / 'missing'} does not exist"
