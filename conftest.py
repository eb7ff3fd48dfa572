"""Shared test fixtures: a tiny text encoder saved to a local folder (no downloads), which every
test file uses to exercise the --text-encoder PATH loading path quickly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
