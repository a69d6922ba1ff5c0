"""A CPU stand-in for flash-attention's semantics, to test on CPU what flash-attention does on a GPU: registered with
transformers as the attention kernel 'varlen_emulation' (float32, plain torch). Like flash-attention in transformers
5.17-5.24 it gets a 2-D padding mask (no 4-D mask) and reads packed samples from restarting position ids only when the
batch has one row; with more rows it attends causally across the whole row, so packed samples see each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "varlen_emulation"


def varlen_emulation(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                     **kwargs):
    batch, heads, length, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    allowed = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None].repeat(batch, 1, 1)
    if attention_mask is not None:  # padded rows: padding keys are never attended
        allowed &= attention_mask[:, None, -length:].bool()
    elif batch == 1 and position_ids is not None:  # one row: samples split where positions restart
        segment = (position_ids.reshape(1, -1) == 0).cumsum(-1)
        allowed &= segment[:, :, None] == segment[:, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, varlen_emulation)
AttentionMaskInterface.register(NAME, flash_attention_mask)
