"""Use the trained model: merge, prompts equal to training, memorized answers, batched == single, chat."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mftcoder.cli import main
from mftcoder.config import build_config
from mftcoder.data.records import parse_record
from mftcoder.data.tokenize import encode_conversations
from mftcoder.infer import Sampling, generate, load, prompt_ids
from mftcoder.merge import merge
from mftcoder.model import DEMO_DATA
from mftcoder.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def short_docstring_records(count: int) -> list[dict]:
    records = [json.loads(line) for line in (DEMO_DATA / "code_docstring" / "train.jsonl").read_text().splitlines()]
    short = [r for r in records if len(r["chat_rounds"][-1]["content"]) < 60 and len(r["chat_rounds"][-2]["content"]) < 200]
    return short[:count]


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """The tiny model trained until it has memorized four short demo samples (60 steps)."""
    root = tmp_path_factory.mktemp("memorized")
    records = short_docstring_records(4)
    (root / "task").mkdir()
    (root / "task" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config, _ = build_config({"data_paths": [str(root / "task")], "model_config": "tiny-test", "seq_length": 256,
                              "output_dir": str(root / "out"), "per_device_train_batch_size": 4,
                              "learning_rate": 3e-3, "lr_scheduler_type": "constant", "num_warmup_steps": 5,
                              "max_steps": 60, "num_train_epochs": 100, "evaluation_strategy": "no",
                              "data_split": "1,0,0", "checkpointing_steps": 1000, "data_cache_dir": str(root / "c")})
    result = train(config)
    assert result.step_losses[-1] < 0.05
    return result.final_checkpoint, records


def test_memorized_answers_come_back_and_stop_at_eos(memorized, tmp_path):
    checkpoint, records = memorized
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"chat_rounds": r["chat_rounds"][:-1], "id": i}) + "\n"
                               for i, r in enumerate(records)))
    assert main(["generate", "--model", str(checkpoint), "--input", str(prompts), "--output",
                 str(tmp_path / "out.jsonl"), "--max_new_tokens", "60", "--batch_size", "3"]) == 0
    outputs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in outputs] == [0, 1, 2, 3]
    assert [o["generations"] for o in outputs] == [[r["chat_rounds"][-1]["content"]] for r in records]


def test_batched_left_padding_equals_one_by_one(memorized):
    checkpoint, records = memorized
    model, tokenizer = load(checkpoint)
    other = [json.loads(line) for line in (DEMO_DATA / "code_generation" / "train.jsonl").read_text().splitlines()[:4]]
    conversations = [parse_record(json.dumps(r))[:-1] for r in records + other]
    prompts = [prompt_ids(tokenizer, turns) for turns in conversations]
    assert len({len(p) for p in prompts}) > 3  # really different lengths, so padding matters
    sampling = Sampling(max_new_tokens=24)
    batched = generate(model, tokenizer, prompts, sampling, batch_size=8)
    single = [generate(model, tokenizer, [p], sampling)[0] for p in prompts]
    assert batched == single


def test_generate_prompt_is_the_training_prefix(memorized):
    checkpoint, records = memorized
    _, tokenizer = load(checkpoint)
    from mftcoder.data.template import build_template

    template = build_template("mftcoder", {}, tokenizer)
    for record in records:
        turns = parse_record(json.dumps(record))
        prompt = prompt_ids(tokenizer, turns[:-1])
        (train_ids, mask), = encode_conversations(tokenizer, template, [turns])
        first_supervised = int(mask.argmax())
        assert prompt == train_ids[:first_supervised].tolist()
        assert prompt == tokenizer.apply_chat_template([{"role": t.role, "content": t.content} for t in turns[:-1]],
                                                       add_generation_prompt=True, return_dict=False)


def test_plain_prompts_and_bad_prompt_files(memorized, tmp_path, capsys):
    checkpoint, records = memorized
    good = tmp_path / "plain.jsonl"
    good.write_text(json.dumps({"prompt": records[0]["chat_rounds"][0]["content"]}) + "\n")
    assert main(["generate", "--model", str(checkpoint), "--input", str(good), "--output", str(tmp_path / "o.jsonl"),
                 "--max_new_tokens", "40", "--num_return_sequences", "2", "--do_sample", "--temperature", "0.01"]) == 0
    (out,) = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert out["generations"] == [records[0]["chat_rounds"][-1]["content"]] * 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]}\n{oops\n')
    assert main(["generate", "--model", str(checkpoint), "--input", str(bad), "--output", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: a prompt must end with a human turn" in err and f"{bad}:3: invalid JSON" in err
    assert not (tmp_path / "x.jsonl").exists()


def read_until(fd: int, pattern: str, timeout: float = 120.0) -> str:
    text, deadline = "", time.time() + timeout
    while pattern not in text:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise TimeoutError(f"waited for {pattern!r}; got {text[-500:]!r}")
        try:
            text += os.read(fd, 4096).decode(errors="replace")
        except OSError:
            break
    return text


def test_chat_in_a_pseudo_terminal(memorized):
    checkpoint, records = memorized
    question, answer = records[0]["chat_rounds"][0]["content"], records[0]["chat_rounds"][-1]["content"]
    typed = question.replace("\n", "\\\n") + "\n"  # continuation lines end with a backslash
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "mftcoder", "chat", "--model", str(checkpoint),
                                "--max_new_tokens", "40"], stdin=follower, stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    try:
        read_until(leader, ">>> ")
        os.write(leader, typed.encode())
        first = read_until(leader, ">>> ")
        assert answer in first  # streamed
        os.write(leader, b"And in one word?\n")
        read_until(leader, ">>> ")
        os.write(leader, b"/reset\n")
        assert "(conversation cleared)" in read_until(leader, ">>> ")
        os.write(leader, typed.encode())
        again = read_until(leader, ">>> ")
        assert answer in again  # the history is gone: the same prompt gives the same greedy answer
        os.write(leader, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(leader)


def test_lora_merge_equals_base_plus_adapter(tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, _ = build_config({"data_paths": [str(DEMO_DATA / "code_docstring")], "model_config": "tiny-test",
                              "peft_type": "lora", "learning_rate": 2e-2, "max_steps": 3, "seq_length": 64,
                              "per_device_train_batch_size": 2, "evaluation_strategy": "no",
                              "output_dir": str(tmp_path / "run"), "data_cache_dir": str(tmp_path / "c")})
    adapter = train(config).final_checkpoint
    base = tmp_path / "run" / "base-model"
    assert main(["merge", "--base_model_or_path", str(base), "--adaptor_path", str(adapter),
                 "--merged_output_path", str(tmp_path / "merged"), "--max_shard_size", "20MB"]) == 0
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1  # sharded
    ids = torch.randint(0, 50000, (2, 17))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        plain_base = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert (reference - plain_base).abs().max() > 1e-3  # the adapter changes the model
    # Loading the merged directory needs nothing from mftcoder.
    script = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval();"
              f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r});"
              "assert t.chat_template and t.eos_token == '<|endoftext|>' and t.pad_token == '<|padding|>';"
              "assert not any(k.startswith('mftcoder') for k in sys.modules);"
              f"torch.save(m(torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    merged = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(merged, reference, atol=1e-5, rtol=1e-5)
    check_merge_never_mixes_or_destroys(tmp_path, base, adapter, ids, reference, capsys, monkeypatch)


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def check_merge_never_mixes_or_destroys(tmp_path, base, adapter, ids, reference, capsys, monkeypatch):
    capsys.readouterr()
    out = tmp_path / "merged"
    before, base_before = folder_digest(out), folder_digest(base)
    args = ["merge", "--base", str(base), "--adapter", str(adapter)]
    assert main([*args, "--out", str(out)]) == 2  # an existing, non-empty --out
    assert capsys.readouterr().err.strip() == (f"error: --out {out}: the folder exists and is not empty; its files "
                                               "would mix with the merged model's: choose another folder, or pass "
                                               "--overwrite to replace it")
    for into in (base, base / "sub", tmp_path / "run"):  # the base itself, a folder inside it, one that holds it
        assert main([*args, "--out", str(into), "--overwrite"]) == 2
        assert f"it overlaps the input folder {base}" in capsys.readouterr().err
    assert folder_digest(base) == base_before and folder_digest(out) == before

    class Killed(BaseException):
        pass

    from transformers import PreTrainedTokenizerBase

    def killed(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as patch:  # stopped after the weights, before the tokenizer: --out is as it was
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
        with pytest.raises(Killed):
            main([*args, "--out", str(out), "--overwrite"])
    assert folder_digest(out) == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert main([*args, "--out", str(out), "--overwrite"]) == 0  # one 5GB shard replaces the 20MB shards
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.allclose(again, reference, atol=1e-5, rtol=1e-5)


def test_merge_refuses_a_mismatched_adapter(tmp_path, capsys):
    config, _ = build_config({"data_paths": [str(DEMO_DATA / "code_docstring")], "model_config": "tiny-test",
                              "peft_type": "lora", "max_steps": 1, "seq_length": 48, "evaluation_strategy": "no",
                              "per_device_train_batch_size": 1, "output_dir": str(tmp_path / "run"),
                              "data_cache_dir": str(tmp_path / "c")})
    adapter = train(config).final_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads((ROOT / "mftcoder" / "assets" / "models" / "tiny-test.json").read_text())
    values.update(hidden_size=64, intermediate_size=256)  # same architecture, other shapes
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**values)).save_pretrained(tmp_path / "other")
    assert main(["merge", "--base", str(tmp_path / "other"), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "does not belong to this base model (gpt_neox)" in err and "expects input size 128, the base has 64" in err
    assert not (tmp_path / "m").exists()


def test_a_half_precision_checkpoint_computes_in_float32_on_cpu_unless_asked(memorized, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, records = memorized
    AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp_path / "bf16")
    model, _ = load(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = load(tmp_path / "bf16", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"chat_rounds": records[0]["chat_rounds"][:-1]}) + "\n")
    assert main(["generate", "--model", str(tmp_path / "bf16"), "--input", str(prompts), "--output",
                 str(tmp_path / "o.jsonl"), "--max_new_tokens", "60", "--dtype", "float32"]) == 0
    (out,) = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(out["generations"]) == 1 and out["generations"][0]


def test_adapters_on_gpt2_conv1d_layers_are_checked_and_merged(tmp_path):
    """GPT-2-style models hold their projections in Conv1D layers (a linear layer with its weight stored [in, out])."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from mftcoder.merge import AdapterMismatch, check_adapter_fits
    from mftcoder.model import SHIPPED_TOKENIZER

    def gpt2(width: int, folder: str):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=50304, n_embd=width, n_layer=1,
                                                                      n_head=4, n_positions=64))
        model.save_pretrained(tmp_path / folder)
        shutil.copytree(SHIPPED_TOKENIZER, tmp_path / folder, dirs_exist_ok=True)
        return model

    base = gpt2(32, "base")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained adapter, not the zero one LoRA starts from
    ids = torch.randint(0, 50000, (2, 9))
    with torch.no_grad():
        expected = lora.eval()(ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    check_adapter_fits(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, expected, atol=1e-5)
    with pytest.raises(AdapterMismatch, match="'transformer.h.0.attn.c_attn': the adapter expects input size 32, the "
                                              "base has 64"):
        check_adapter_fits(gpt2(64, "other"), tmp_path / "adapter")
