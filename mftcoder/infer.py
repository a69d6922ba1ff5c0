"""Use a trained model with the prompt format it was trained on: load, render, generate (batched), chat."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from mftcoder.config import ConfigError
from mftcoder.data.records import Turn, read_jsonl, record_turns
from mftcoder.data.template import ChatTemplate, ModelTemplate, saved_template, stop_token_ids
from mftcoder.data.tokenize import encode_conversations
from mftcoder.merge import check_adapter_fits
from mftcoder.model_folder import check_model_folder


@dataclass
class Sampling:
    """Generation controls. The reference's advice: for pass@1 in code generation sample with top_p 0.95 and
    temperature 0.1; without sampling, greedy (num_beams 1) or num_beams 3."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    num_return_sequences: int = 1
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams,
                  "num_return_sequences": self.num_return_sequences, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def load(model_dir: str | Path, adapter: str | Path | None = None, device: str | None = None,
         trust_remote_code: bool = False, dtype: str | None = None):
    """(model, tokenizer) ready for generation. The tokenizer (and its chat template) comes from the adapter
    checkpoint when given, else from the model directory; without a chat template, the default is used.
    dtype: None computes in float32 on CPU (half precision is slow there) and in the checkpoint's dtype on GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(Path(model_dir), "--model", trust_remote_code)
    tokenizer_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        print(f"note: {tokenizer_dir} has no chat_template; using the default mftcoder template", file=sys.stderr)
        tokenizer.chat_template = saved_template(tokenizer).jinja()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float32" if torch.device(device).type == "cpu" else "auto")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code,
                                                 dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        check_adapter_fits(model, Path(adapter))
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, turns: list[Turn] | list[dict],
               template: ChatTemplate | ModelTemplate | None = None) -> list[int]:
    """Token ids of a conversation (Turns or {role, content} dicts) that ends with the human turn to answer, up to
    and including the bot marker, rendered and tokenized as in training (template: the tokenizer's, unless given)."""
    if turns and isinstance(turns[0], dict):
        turns = record_turns({"chat_rounds": list(turns)}, prompt_only=True)
    (ids, _), = encode_conversations(tokenizer, template or saved_template(tokenizer), [tuple(turns)],
                                     add_generation_prompt=True)
    return ids.tolist()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8,
             progress: bool = False, streamer=None, stop_when: Callable[[str], bool] | None = None,
             synced_gpus: bool = False,
             on_batch: Callable[[int, list[list[str]]], None] | None = None) -> list[list[str]]:
    """Generate for each prompt (token ids), left-padded in batches; returns num_return_sequences new texts
    per prompt, decoded without the prompt and stopped at EOS, the template's end-of-turn token, or once
    `stop_when(text so far)` holds. synced_gpus: every rank runs as many forward passes (sharded models).
    on_batch(first prompt's index, its texts) is called after each batch (to save results as they come)."""
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, saved_template(tokenizer))
    outputs: list[list[str]] = []
    torch.manual_seed(sampling.seed)
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress or len(batches) < 2):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        criteria = StoppingCriteriaList([TextStop(tokenizer, width, stop_when)]) if stop_when else None
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                   streamer=streamer, stopping_criteria=criteria, synced_gpus=synced_gpus,
                                   **sampling.generate_kwargs())
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        n = sampling.num_return_sequences
        batch = [texts[i:i + n] for i in range(0, len(texts), n)]
        if on_batch is not None:
            on_batch(start, batch)
        outputs += batch
    return outputs


class TextStop(StoppingCriteria):
    """A stopping criterion: each row stops once stop_when(its new text) holds."""

    def __init__(self, tokenizer, prompt_width: int, stop_when: Callable[[str], bool]):
        self.tokenizer, self.width, self.stop_when = tokenizer, prompt_width, stop_when

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([self.stop_when(text) for text in texts], dtype=torch.bool, device=input_ids.device)


def read_prompts(path: Path) -> tuple[list[dict], list[tuple[Turn, ...]]]:
    """Records of a prompts JSONL file (chat_rounds ending with a human turn, or {"prompt": ...}); every bad
    line is reported as file:line: reason before anything is generated."""
    pairs = read_jsonl(path, lambda record, _: (record, record_turns(record, prompt_only=True)), what="prompt")
    return [record for record, _ in pairs], [turns for _, turns in pairs]


def open_output(path: Path, option: str = "--output"):
    """A text file opened for writing (parents made) before any work, or a one-sentence error naming it."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give the path of a JSONL file to write")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: cannot write there ({existing} is a file, not a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there ({exc.strerror})") from None


def generate_file(model, tokenizer, records: list[dict], conversations: list[tuple[Turn, ...]], output,
                  sampling: Sampling, batch_size: int = 8) -> int:
    """`mftcoder generate`: one output line per input record, the record plus its "generations", written (and
    flushed) batch by batch to the open file `output`, so an interrupted run keeps what it generated."""
    template = saved_template(tokenizer)
    prompts = [prompt_ids(tokenizer, turns, template) for turns in conversations]

    def save(start: int, batch: list[list[str]]) -> None:
        for record, generations in zip(records[start:start + len(batch)], batch):
            output.write(json.dumps({**record, "generations": generations}, ensure_ascii=False) + "\n")
        output.flush()

    generate(model, tokenizer, prompts, sampling, batch_size, progress=True, on_batch=save)
    return len(records)


def chat(model, tokenizer, sampling: Sampling, read=input, write=print, system: str | None = None) -> None:
    """An interactive session that keeps the history in the training format: /reset, /system TEXT, /quit.
    A line ending with a backslash continues on the next (for code). `read(prompt)` raises EOFError at the end."""
    from transformers import TextStreamer

    history: list[Turn] = []
    write("mftcoder chat: /reset clears the conversation, /system TEXT sets the system prompt, /quit ends; "
          "end a line with \\ to continue it")
    while True:
        try:
            text = read(">>> ")
            while text.endswith("\\"):
                text = text[:-1] + "\n" + read("... ")
        except EOFError:
            write("")
            return
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            history = []
            write("(conversation cleared)")
        elif text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)")
        elif text.strip():
            history.append(Turn("human", text))
            turns = ([Turn("system", system)] if system else []) + history
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            (answer,), = generate(model, tokenizer, [prompt_ids(tokenizer, turns)], sampling, streamer=streamer)
            history.append(Turn("bot", answer))
