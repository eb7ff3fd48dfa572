"""Shared test fixtures and helpers, for test_nami.py and every file in tests/ (pytest finds this file
at the repository root; test files import the helpers as `from conftest import tiny_run`):
a tiny text encoder saved to a local folder (no downloads), which every test file uses to exercise
the --text-encoder PATH loading path quickly; the TrainConfig of a few-second run; random weights;
and a folder in the layout of the authors' release, made of tiny random models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common import encoders
from training import config


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


def randomize(model: torch.nn.Module, seed: int = 0):
    """Random weights everywhere (the real init zeroes the output, which would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1])))
    return model


# ---------------------------------------------------------------------------------------------
# Real scale: encoders and VAE from local folders, the released NAMI-2B layout.
# No weights can be downloaded here, so every loading path runs on tiny models that the tests
# build, save to a folder and load back through the code a user runs.
# ---------------------------------------------------------------------------------------------

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=False,
                 axes_dims_rope=(4, 6, 6))


def save_tiny_vae(folder):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), norm_num_groups=4,
                  latent_channels=4, scaling_factor=0.5, shift_factor=0.1).save_pretrained(folder)


def save_tiny_mt5_tokenizer(folder):
    """A T5 (sentencepiece-style unigram) tokenizer over single characters and a few pieces, as the
    mT5 folder's: ids of pieces, then </s>, then <pad> (id 0) up to the length asked for."""
    from transformers import T5Tokenizer
    pieces = ["▁a", "▁photo", "▁of", "▁cat", ".", ",", "(", ")"] + list("abcdefghijklmnopqrstuvwxyz▁")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - i) for i, p in enumerate(pieces)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)


@pytest.fixture(scope="session")
def released_dir(tmp_path_factory, encoder_dir):
    """A folder in the layout of the authors' release (release src/infer.py:176-205), tiny random models:
    transformer/pytorch_model_fsdp.bin, bridge_flow.bin, vae/, mt5/ (MT5EncoderModel + T5 tokenizer),
    mclip/tokenizer/ (BertTokenizer) and mclip/clip_text_encoder/ (BertModel without pooling layer).
    One file more than the release: transformer/config.json, which gives the tiny shape (without it
    the loader builds the release's 2b shape, infer.py:136-151)."""
    from diffusers import FluxTransformer2DModel
    from transformers import AutoTokenizer, BertConfig, BertModel, MT5Config, MT5EncoderModel
    root = tmp_path_factory.mktemp("released") / "weights"
    (root / "transformer").mkdir(parents=True)
    torch.manual_seed(0)
    flux = randomize(FluxTransformer2DModel(**TINY_FLUX), seed=1)
    torch.save(flux.state_dict(), root / "transformer" / "pytorch_model_fsdp.bin")
    (root / "transformer" / "config.json").write_text(json.dumps(TINY_FLUX))
    g = torch.Generator().manual_seed(2)
    torch.save({"scale": torch.tensor([1.1, 0.9]), "shift.0": torch.randn(1, 4, 8, 8, generator=g),
                "shift.1": torch.randn(1, 4, 16, 16, generator=g)}, root / "bridge_flow.bin")
    save_tiny_vae(root / "vae")
    save_tiny_mt5_tokenizer(root / "mt5")
    mt5_tokenizer = AutoTokenizer.from_pretrained(root / "mt5", local_files_only=True)
    randomize(MT5EncoderModel(MT5Config(vocab_size=len(mt5_tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2)), seed=3).save_pretrained(root / "mt5")
    bert_tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    bert_tokenizer.save_pretrained(root / "mclip" / "tokenizer")
    BertModel(BertConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=20, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(root / "mclip" / "clip_text_encoder")
    return root
