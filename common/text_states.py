"""The text states of prompts as the transformer reads them: the token states of a text encoder and one pooled
vector per prompt (paper §3.2; the padding and pooling rules: docs/method.md §3).

It needs torch alone and imports nothing of ours: common/encoders.py's TextEncoder computes with it, and
training/export.py copies this file as it is beside the pipeline of an exported diffusers folder, so that the two
encode a prompt the same way (docs/export.md).

    txt, pooled = text_states(prompts, tokenizer, encoder, max_len=16)
"""
from __future__ import annotations

import torch

CHUNK = 64  # distinct prompts encoded per forward pass (common/encoders.py TextEncoder.encode, the exported pipeline)
PADDINGS = ("zeros", "unmasked")
POOLED_RULES = ("mean", "cls", "pooler_output")


@torch.no_grad()
def text_states(prompts, tokenizer, encoder, max_len: int, pad: str = "zeros", pooled_tokenizer=None,
                pooled_encoder=None, pooled_len: int = 77, pooled_rule: str = "mean", device="cpu"):
    """prompts -> txt (B, max_len, dim), pooled (B, pooled_dim), float32 on `device`; every prompt padded to max_len
    tokens (longer ones truncated).

    pad "zeros": the encoder masks the padding tokens and their states are zeroed (ours); "unmasked": the encoder
    gets the token ids alone, every token attends to the padding, and all max_len states are kept, as the release
    runs mT5 (src/infer.py:84-88). pooled_rule "mean": the masked mean of txt's states, without a pooled encoder
    [ours]; "cls": the CLS state of pooled_encoder (the release's BERT-style mCLIP); "pooler_output": its pooler
    output (a transformers CLIP text model: the EOS state after the final norm, as SD3 and FLUX use it). The pooled
    encoder always gets its mask (release src/infer.py:42-45)."""
    if pad not in PADDINGS or pooled_rule not in POOLED_RULES:
        raise ValueError(f"pad must be one of {PADDINGS} and pooled_rule one of {POOLED_RULES}, got {pad!r}, "
                         f"{pooled_rule!r}")
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    out = encoder(input_ids=ids, attention_mask=mask if pad == "zeros" else None)
    txt = out.last_hidden_state.float()                              # (B, max_len, dim)
    m = mask.unsqueeze(-1).float()
    if pad == "zeros":
        txt = txt * m
    if pooled_encoder is None:
        return txt, (txt * m).sum(1) / m.sum(1).clamp(min=1)          # masked mean [ours]
    tokens = pooled_tokenizer(prompts, padding="max_length", truncation=True, max_length=pooled_len,
                              return_tensors="pt")
    out = pooled_encoder(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
    pooled = out.pooler_output if pooled_rule == "pooler_output" else out.last_hidden_state[:, 0]
    return txt, pooled.float()
