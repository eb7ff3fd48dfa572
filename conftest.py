"""Shared test fixtures: a tiny text encoder saved to a local folder (no downloads), which every
test file uses to exercise the --text-encoder PATH loading path quickly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import config
import encoders


def tiny_encoder(folder: Path) -> str:
    """A 1-layer, 32-wide BERT with the default (MiniLM) tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(encoders.default_text_encoder_path()), local_files_only=True)
        tok.save_pretrained(folder)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


def tiny_run(out, encoder_dir, **kw):
    """The TrainConfig of a few-second training run of the tiny preset (kw overrides any field)."""
    base = dict(size="tiny", resolution=16, vae=None, world_level=3, jump_noise=False, batch_size=8, max_steps=6, warmup=2, bridge_steps=5, text_len=16,
                text_encoder=encoder_dir, out=str(out), sample_every=1000, ckpt_every=3, progress=False)
    base.update(kw)
    return config.TrainConfig(**base)
