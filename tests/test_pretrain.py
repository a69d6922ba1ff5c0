"""objective: pretrain: raw-text documents (JSONL `content`, source files), chunks that overlap by one token, splits by
document, and a step-0 validation loss equal to the plain model's own language-modelling loss."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_task

from mftcoder.cli import main
from mftcoder.config import build_config, split_fractions
from mftcoder.data.cache_check import cache_problem
from mftcoder.data.documents import DocumentEncoder, Documents, chunk_starts
from mftcoder.data.prepare import prepare_data, split_by_line
from mftcoder.data.records import DataError
from mftcoder.data.tasks import split_indices
from mftcoder.data import tokenize
from mftcoder.data.tokenize import CACHE_FORMAT
from mftcoder.model import DEMO_DATA
from mftcoder.objectives import OBJECTIVES, make_objective
from mftcoder.train.distributed import DistEnv
from mftcoder.train.loop import Trainer, train

ADD = "def add(a, b):\n    return a + b\n"
ADD_IDS = [1545, 823, 9, 66, 13, 270, 2262, 187, 50274, 2309, 247, 559, 270, 187]  # GPT-NeoX-20B, no BOS by default
EOS = 0


def answers(task: str, start: int, stop: int) -> list[str]:
    lines = (DEMO_DATA / task / "train.jsonl").read_text().splitlines()[start:stop]
    return [json.loads(line)["chat_rounds"][-1]["content"] for line in lines]


@pytest.fixture(scope="module")
def pretrain_tasks(tmp_path_factory):
    """Two pretraining tasks: 12 demo answers as .py files (4 in a subfolder, plus a .txt that is not read), and 12
    as {"content"} JSONL records; 28 to 301 tokens each, so with seq_length 64 most are cut into chunks."""
    root = tmp_path_factory.mktemp("pretrain")
    code = root / "code"
    (code / "sub").mkdir(parents=True)
    for i, text in enumerate(answers("code_generation", 0, 12)):
        (code / ("sub" if i % 3 == 0 else "") / f"m{i:02d}.py").write_text(text)
    (code / "notes.txt").write_text("not a source file of this run")
    write_task(root, "text", [{"content": text, "id": i} for i, text in enumerate(answers("code_generation", 12, 24))])
    return {"data_paths": [str(code), str(root / "text")], "data_cache_dir": str(root / ".cache"),
            "objective": "pretrain"}


def pretrain_config(tasks: dict, output_dir, **overrides):
    values = {**tasks, "model_config": "tiny-test", "output_dir": str(output_dir), "seq_length": 64,
              "per_device_train_batch_size": 2, "learning_rate": 2e-3, "max_steps": 1, "log_interval": 1,
              "evaluation_strategy": "no", "data_split": "70,30,0", "num_warmup_steps": 0, "plot_curves": False,
              "evaluate_before_training": False, "per_device_valid_batch_size": 4, **overrides}
    return build_config(values)[0]


def test_a_document_is_its_text_and_eos_every_token_after_the_first_a_target(tokenizer, template):
    encoder = DocumentEncoder(tokenizer, template, 64)
    chunk = encoder(("t.py", [(1, ADD)]))
    assert chunk.ids.tolist() == ADD_IDS + [EOS] and chunk.lengths.tolist() == [15] and chunk.lines.tolist() == [1]
    assert chunk.mask.tolist() == [0] + [1] * 14 and chunk.errors == [] and chunk.as_text == 0
    # Control-token text in a document is text (as in SFT message contents), counted.
    text = encoder(("t.py", [(1, 'print("<|endoftext|>")\n')]))
    assert text.ids.tolist() == [3845, 43467, 93, 423, 1171, 1156, 49651, 2807, 187, EOS] and text.as_text == 1


def test_a_long_document_becomes_chunks_that_overlap_by_one_token(tokenizer, template):
    assert [list(chunk_starts(n, 8)) for n in (2, 8, 9, 15, 16)] == [[0], [0], [0, 7], [0, 7], [0, 7, 14]]
    document = np.array(ADD_IDS + [EOS])  # 15 tokens
    for length, starts in ((8, [0, 7]), (5, [0, 4, 8, 12]), (15, [0]), (14, [0, 13])):
        chunk = DocumentEncoder(tokenizer, template, length)(("t.py", [(1, ADD)]))
        pieces = np.split(chunk.ids, np.cumsum(chunk.lengths)[:-1])
        masks = np.split(chunk.mask, np.cumsum(chunk.lengths)[:-1])
        assert [p.tolist() for p in pieces] == [document[s:s + length].tolist() for s in starts]
        assert all(m.tolist() == [0] + [1] * (len(m) - 1) for m in masks) and min(chunk.lengths) >= 2
        targets = np.concatenate([s + np.flatnonzero(m) for s, m in zip(starts, masks)])
        assert sorted(targets.tolist()) == list(range(1, 15))  # every token after the first, exactly once
    assert [p.tolist() for p in np.split(chunk.ids, [14])] == [ADD_IDS, [ADD_IDS[-1], EOS]]  # (14): the last two


def test_source_files_and_jsonl_records_are_read_and_bad_ones_reported(tmp_path, tokenizer, template, capsys):
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "add.py").write_text(ADD)
    (code / "latin1.py").write_bytes("# caf\xe9\nx = 1\n".encode("latin-1"))
    (code / "empty.py").write_text("  \n")
    (code / "readme.md").write_text("# not read")
    os.mkfifo(code / "pipe.py")
    text = write_task(tmp_path, "text", [{"content": "x = 1\n", "source": "a"}, {"text": "x"}, {"content": 3},
                                         {"content": ""}, "{oops"])
    config = build_config({"data_paths": [str(code), str(text)], "objective": "pretrain", "seq_length": 8,
                           "data_cache_dir": str(tmp_path / "cache"), "on_bad_record": "skip"})[0]
    records = make_objective(config).records
    assert isinstance(records, Documents) and records.suffixes == (".jsonl", ".py")
    prepared = prepare_data(config, tokenizer, template, records=records)
    code_task, text_task = prepared.per_task
    assert [p.relative_to(code).as_posix() for p in code_task.task.files] == ["empty.py", "latin1.py", "pkg/add.py"]
    assert prepared.skipped_entries == [f"{code / 'pipe.py'}: not a regular file (a FIFO); not read, skipped"]
    assert code_task.data.errors == [f"{code / 'empty.py'}:1: file is empty (no text to learn from)",
                                     f"{code / 'latin1.py'}:1: not valid UTF-8: invalid continuation byte (byte 0xe9 "
                                     "at offset 5)"]
    assert np.asarray(code_task.data.ids).tolist() == ADD_IDS[:8] + ADD_IDS[7:] + [EOS]  # two chunks, one document
    assert code_task.data.num_lines == 3 and len(code_task.data) == 2 and code_task.data.lines.tolist() == [1, 1]
    assert np.asarray(text_task.data.ids).tolist() == [89, 426, 337, 187, EOS] and text_task.data.lines.tolist() == [1]
    assert [e.split(": ", 1)[1] for e in text_task.data.errors] == [
        "missing 'content' (a pretraining record is {\"content\": \"text\"})", "'content': expected a string, got int",
        "'content' is empty", "invalid JSON: Expecting property name enclosed in double quotes at column 2"]
    # data check reads the objective's records and reports the chunking; SFT reads only the .jsonl files.
    base = ["data", "check", "/dev/null", f"data_paths=[{code},{text}]", f"data_cache_dir={tmp_path / 'cache'}",
            "on_bad_record=skip"]
    assert main(base + ["objective=pretrain", "seq_length=8"]) == 0
    out = capsys.readouterr().out
    assert "code: 1 document(s), 1 of them longer than 8 tokens and cut into chunks; 2 chunk(s) in all" in out
    assert "text: 1 document(s), 0 of them longer than 8 tokens and cut into chunks; 1 chunk(s) in all" in out
    assert "6 bad record(s) (skipped and counted" in out and "1 entry(ies) under the task folders" in out
    with pytest.raises(DataError, match=f"{code}: no .jsonl files under this folder"):
        prepare_data(build_config({"data_paths": [str(code)], "data_cache_dir": str(tmp_path / "cache")})[0], tokenizer,
                     template)


def test_the_cache_is_per_seq_length_and_checked_per_document(pretrain_tasks, tokenizer, template, tmp_path,
                                                              monkeypatch):
    config = pretrain_config(pretrain_tasks, "unused")
    records = make_objective(config).records
    first = prepare_data(config, tokenizer, template, records=records).per_task[0].data
    again = prepare_data(config, tokenizer, template, records=records).per_task[0].data
    assert again.from_cache and again.chunk_length == 64 and again.digest == first.digest
    monkeypatch.setattr(tokenize, "PARALLEL_MIN_BYTES", 0)
    parallel = tokenize.load_tokenized(first.task, tokenizer, template, tmp_path / "parallel", 2, None, 64, records)
    assert not parallel.from_cache and parallel.digest == first.digest
    assert np.array_equal(parallel.starts, first.starts) and np.array_equal(parallel.lines, first.lines)
    other = pretrain_config(pretrain_tasks, "unused", seq_length=96)
    longer = prepare_data(other, tokenizer, template, records=make_objective(other).records).per_task[0].data
    # ceil(n / (seq_length - 1)) chunks of a document of n tokens and EOS: 12 documents of 28 to 301 tokens.
    assert not longer.from_cache and (len(first), len(longer)) == (29, 21) and first.num_lines == longer.num_lines == 12
    # meta.json counts documents (not chunks), and chunks are at most chunk_length long: both are checked.
    (cache,) = [d for d in Path(config.data_cache_dir).glob("code-*") if d.is_dir()
                and json.loads((d / "meta.json").read_text())["chunk_length"] == 64]
    shutil.copytree(cache, tmp_path / "c")
    assert cache_problem(tmp_path / "c", 12, len(tokenizer), CACHE_FORMAT) is None
    meta = json.loads((cache / "meta.json").read_text())
    for change, problem in (
            ({"num_lines": 29}, "meta.json counts 29 lines, but holds 12 documents and 0 errors"),
            ({"chunk_length": 32}, "index.npz holds records longer than the chunk length 32 of meta.json")):
        (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, **change}))
        assert cache_problem(tmp_path / "c", 12, len(tokenizer), CACHE_FORMAT) == problem


def test_chunks_of_a_document_stay_in_one_split_and_other_splits_are_unchanged(pretrain_tasks, small_tasks, pair_tasks,
                                                                               tokenizer, template):
    config = pretrain_config(pretrain_tasks, "unused", data_split="50,25,25")
    prepared = prepare_data(config, tokenizer, template, records=make_objective(config).records)
    for t in prepared.per_task:
        document = {int(i): (int(t.data.file_index[i]), int(t.data.lines[i])) for i in range(len(t.data))}
        splits = [{document[int(i)] for i in part} for part in (t.train, t.valid, t.test)]
        assert sorted(np.concatenate([t.train, t.valid, t.test]).tolist()) == list(range(len(t.data)))
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        assert [len(s) for s in splits] == [6, 3, 3] and len(t.data) > 12
    # One example per line (SFT, preference pairs): the same indices as split_indices over the records.
    for tasks in (small_tasks, pair_tasks):
        config = build_config({**tasks, "seq_length": 96, "data_split": "60,25,15", "over_length": "drop"})[0]
        prepared = prepare_data(config, tokenizer, template, records=make_objective(config).records)
        for t in prepared.per_task:
            expected = split_indices(len(t.data), split_fractions("60,25,15"), 42, t.task.name)
            got = split_by_line(t.data, split_fractions("60,25,15"), 42, True)
            assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, expected))
            assert all(np.array_equal(a, b[t.kept[b]]) for a, b in zip((t.train, t.valid, t.test), expected))


def test_step0_validation_loss_is_the_models_own_lm_loss(pretrain_tasks, tmp_path):
    config = pretrain_config(pretrain_tasks, tmp_path, evaluate_before_training=True, evaluation_strategy="steps",
                             weighted_loss_mode="case1", padding_mode="pack")
    assert OBJECTIVES["pretrain"] is type(make_objective(config))
    trainer = Trainer(config, DistEnv())
    try:
        model = copy.deepcopy(trainer.model).eval()
        result = trainer.run()
    finally:
        trainer.close()
    step0 = result.evaluations[0]
    sums, counts = {}, {}
    with torch.no_grad():
        for t in trainer.data.per_task:
            assert len(t.valid) > 0
            for record in t.valid:
                ids = torch.from_numpy(t.sample(int(record))[0].astype(np.int64))[None]
                loss = model(ids, labels=ids).loss.double()
                sums[t.task.name] = sums.get(t.task.name, 0.0) + float(loss) * (ids.shape[1] - 1)
                counts[t.task.name] = counts.get(t.task.name, 0) + ids.shape[1] - 1
    hf = sum(sums.values()) / sum(counts.values())
    print(f"step-0 validation loss {step0['loss']:.8f}, HF model loss {hf:.8f}, difference {step0['loss'] - hf:.2e}")
    assert step0["step"] == 0 and step0["loss"] == pytest.approx(hf, abs=1e-5)
    for name in sums:
        assert step0[f"loss/{name}"] == pytest.approx(sums[name] / counts[name], abs=1e-5)


def test_a_pretrained_lora_adapter_merges_and_generates(pretrain_tasks, tmp_path):
    result = train(pretrain_config(pretrain_tasks, tmp_path / "run", peft_type="lora"))
    assert main(["merge", "--base_model_or_path", str(tmp_path / "run" / "base-model"), "--adaptor_path",
                 str(result.final_checkpoint), "--merged_output_path", str(tmp_path / "merged")]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write add(a, b)."}) + "\n")
    assert main(["generate", "--model", str(tmp_path / "merged"), "--input", str(prompts), "--output",
                 str(tmp_path / "out.jsonl"), "--max_new_tokens", "5"]) == 0
    (output,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert output["prompt"] == "Write add(a, b)." and len(output["generations"]) == 1
