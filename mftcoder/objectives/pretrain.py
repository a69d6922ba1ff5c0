"""Continued pretraining: raw text (JSONL `content` records and source files), every token after a document's first
a target; the loss is SFT's token loss (per-task losses, weighted_loss_mode and balancers as for SFT)."""

from __future__ import annotations

from mftcoder.config import Config
from mftcoder.data.documents import Documents
from mftcoder.objectives.sft import SupervisedFineTuning


class Pretraining(SupervisedFineTuning):
    """SFT's loss over documents cut into chunks of seq_length tokens, each chunk a sample of its own."""

    name = "pretrain"

    def __init__(self, config: Config):
        super().__init__(config)
        self.records = Documents(config.seq_length, tuple(config.pretrain_file_extensions))
