"""Preference pairs: the record forms, and a pass's per-answer sums grouped back into pairs."""

from __future__ import annotations

import torch

from mftcoder.data.batching import Batch
from mftcoder.data.records import BadRecord, Turn, record_turns
from mftcoder.data.tokenize import Conversations


class PreferencePairs(Conversations):
    """A record holds a prompt and two answers; it becomes two conversations whose only supervised part is the
    answer (its content and end-of-turn token). Forms: {"chosen": [turns], "rejected": [turns]} (the same turns but
    the last bot turn), or {"prompt" | "chat_rounds", "chosen": str, "rejected": str} (optional "system")."""

    parts = 2
    last_answer_only = True

    def conversations(self, record: dict) -> tuple[tuple[Turn, ...], ...]:
        prompt, chosen, rejected = pair_turns(record)
        return prompt + (Turn("bot", chosen),), prompt + (Turn("bot", rejected),)

    def cache_tag(self) -> str:
        return "preference-pairs"


def pair_turns(record: dict) -> tuple[tuple[Turn, ...], str, str]:
    """(prompt turns, chosen answer, rejected answer) of a preference record, or BadRecord with the reason."""
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise BadRecord(f"missing '{missing[0]}' (a preference record has 'chosen' and 'rejected')")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        if "prompt" in record or "chat_rounds" in record:
            raise BadRecord("'chosen' and 'rejected' are whole conversations here, so 'prompt'/'chat_rounds' must go")
        sides = []
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            try:
                sides.append(record_turns({"chat_rounds": turns}))
            except BadRecord as exc:
                raise BadRecord(f"{key}: {str(exc).replace('chat_rounds', key)}") from None
        (*prompt, last_chosen), (*prompt_rejected, last_rejected) = sides
        if prompt != prompt_rejected:
            turn = next((i for i, (a, b) in enumerate(zip(prompt, prompt_rejected)) if a != b),
                        min(len(prompt), len(prompt_rejected)))
            raise BadRecord(f"'chosen' and 'rejected' must be the same conversation up to their last bot turn; they "
                            f"differ at turn {turn}")
        if not prompt:
            raise BadRecord("'chosen' and 'rejected' hold only a bot turn: there is no prompt")
        answers = last_chosen.content, last_rejected.content
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" in record and "chat_rounds" in record:
            raise BadRecord("both 'prompt' and 'chat_rounds': the prompt is one or the other")
        if "prompt" not in record and "chat_rounds" not in record:
            raise BadRecord("missing 'prompt' (or 'chat_rounds' ending with the human turn) for the answers")
        prompt = list(record_turns({k: record[k] for k in ("prompt", "chat_rounds", "system") if k in record},
                                   prompt_only=True))
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer.strip():
                raise BadRecord(f"'{key}' is empty")
        answers = chosen, rejected
    else:
        raise BadRecord(f"'chosen' and 'rejected' must both be strings (answers) or both lists (conversations), got "
                        f"{type(chosen).__name__} and {type(rejected).__name__}")
    if answers[0] == answers[1]:
        raise BadRecord("'chosen' and 'rejected' are the same answer: nothing to prefer")
    return tuple(prompt), answers[0], answers[1]


def sequence_sums(batch: Batch, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair (rows: pairs in example order, columns: chosen, rejected): the sums of per-token `values` (loss_mask
    order) over each answer, its token count, and the pair's task."""
    mask = batch.loss_mask
    unique, inverse = torch.unique(batch.token_sample[mask], return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64, device=values.device).index_add(0, inverse, values.double())
    sizes = torch.bincount(inverse, minlength=len(unique)).double()
    key = torch.zeros(len(unique), dtype=torch.long, device=mask.device)
    key[inverse] = batch.token_example[mask] * 2 + batch.token_part[mask]
    task = torch.zeros(len(unique), dtype=torch.long, device=mask.device)
    task[inverse] = batch.token_task[mask]
    order = torch.argsort(key)
    sorted_key = key[order]
    if len(order) % 2 or not bool(((sorted_key[0::2] % 2 == 0) & (sorted_key[1::2] == sorted_key[0::2] + 1)).all()):
        raise RuntimeError("a preference pair was split across passes (a bug: pairs stay in one pass)")
    return sums[order].view(-1, 2), sizes[order].view(-1, 2).to(values.device), task[order].view(-1, 2)[:, 0]


def pair_counts(batch: Batch, num_tasks: int) -> torch.Tensor:
    """Pairs per task in a batch (counted on their chosen answers)."""
    mask = batch.loss_mask
    unique, inverse = torch.unique(batch.token_sample[mask], return_inverse=True)
    task = torch.zeros(len(unique), dtype=torch.long, device=mask.device)
    part = torch.zeros(len(unique), dtype=torch.long, device=mask.device)
    task[inverse], part[inverse] = batch.token_task[mask], batch.token_part[mask]
    return torch.bincount(task[part == 0].cpu(), minlength=num_tasks).double()
