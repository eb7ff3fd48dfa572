"""The frozen encoders (common/encoders.py) from local folders: the text encoder's truncation and
padding, the release's text states (unmasked mT5, masked BERT CLS), a CLIP's pooler output, the
VAE's latent normalisation, and the memory the text encoder holds at scale (a bounded cache, lazy
loading). The models are tiny and built here (conftest.py): nothing is downloaded.

    python -m pytest -q tests/test_encoders.py        # about 20 s
"""
from __future__ import annotations

import pytest
import torch

from common import encoders
from conftest import save_tiny_vae
from training import release


def test_long_prompt_is_truncated_with_a_warning(encoder_dir):
    enc = encoders.TextEncoder(encoder_dir, max_len=8)
    with pytest.warns(UserWarning, match="truncated"):
        txt, pooled = enc.encode(["a red circle " * 50])
    assert txt.shape == (1, 8, 32) and pooled.shape == (1, 32)
    txt, _ = enc.encode(["", "a red circle"])
    assert txt[0, 2:].abs().sum() == 0 and txt[0, :2].abs().sum() > 0  # [CLS] [SEP], then zero padding


def test_released_text_states_are_unmasked_mt5_and_masked_bert_cls(released_dir):
    """The release's encoding (src/infer.py:17-100): mT5 on 256 tokens padded to the maximum, called with the
    ids alone, every state kept; mCLIP's BertModel (no pooling layer) with its mask, the CLS state of 77 tokens."""
    from transformers import AutoTokenizer, BertModel, MT5EncoderModel
    encoder = release.load(released_dir)[2]
    prompts = ["a photo of a cat" + release.PROMPT_SUFFIX, release.NEGATIVE_PROMPT]
    txt, pooled = encoder.encode(prompts)
    assert encoder.identity()["pad"] == "unmasked" and encoder.pooled_rule() == "cls"
    mt5, mt5_tokenizer = MT5EncoderModel.from_pretrained(released_dir / "mt5"), AutoTokenizer.from_pretrained(released_dir / "mt5")
    bert = BertModel.from_pretrained(released_dir / "mclip" / "clip_text_encoder", add_pooling_layer=False)
    bert_tokenizer = AutoTokenizer.from_pretrained(released_dir / "mclip" / "tokenizer")
    assert type(encoder.model) is MT5EncoderModel and encoder.pooled_model.pooler is None
    ids = mt5_tokenizer(prompts, max_length=256, padding="max_length", truncation=True, return_tensors="pt")
    assert ids["attention_mask"][0].sum() < 256 and ids["input_ids"][0, ids["attention_mask"][0].sum() - 1] == 1  # </s>
    tok = bert_tokenizer(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        unmasked = mt5(input_ids=ids["input_ids"]).last_hidden_state
        masked = mt5(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
        cls = bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state[:, 0]
    assert txt.shape == (2, 256, 24) and pooled.shape == (2, 20)
    torch.testing.assert_close(txt, unmasked, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, cls, rtol=0, atol=1e-6)
    assert (txt[0, :4] - masked[0, :4]).abs().max() > 1e-3  # a masked mT5 differs, real tokens included
    # our checkpoints keep the masked rule (padding zeroed); identity() tells the two apart
    ours = encoders.TextEncoder(released_dir / "mt5", 256, pooled_path=released_dir / "mclip")
    assert ours.identity()["pad"] == "zeros" and ours.identity()["pooled_config"] == encoder.identity()["pooled_config"]
    torch.testing.assert_close(ours.encode(prompts[:1])[0][0, :4], masked[0, :4], rtol=0, atol=1e-6)


def test_clip_text_model_gives_its_pooler_output_and_t5_its_encoder(tmp_path, encoder_dir):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel
    tok = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.cls_token_id,
                                 eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    enc = encoders.TextEncoder(encoder_dir, max_len=8, pooled_path=tmp_path / "clip")
    txt, pooled = enc.encode(["a red circle", "a blue square"])
    assert enc.pooled_rule() == "pooler_output" and pooled.shape == (2, 16) and txt.shape == (2, 8, 32)
    t = enc.pooled_tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    out = enc.pooled_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    assert torch.allclose(pooled[0], out.pooler_output[0], atol=1e-5)
    assert not torch.allclose(pooled[0], out.last_hidden_state[0, 0], atol=1e-3)
    # pad="zeros": states after the prompt's tokens are zero; the default pooled is their masked mean
    plain = encoders.TextEncoder(encoder_dir, max_len=8)
    txt, pooled = plain.encode(["a red circle"])
    n = len(plain.tokenizer("a red circle")["input_ids"])
    assert txt[0, n:].abs().sum() == 0 and txt[0, :n].abs().sum() > 0
    assert torch.allclose(pooled[0], txt[0, :n].mean(0), atol=1e-6)


def test_vae_normalises_latents_with_its_config_and_decode_inverts_encode(tmp_path):
    from diffusers import AutoencoderKL
    save_tiny_vae(tmp_path / "vae")
    vae = encoders.load_autoencoder(tmp_path / "vae")
    raw = AutoencoderKL.from_pretrained(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        mode = raw.encode(x).latent_dist.mode()
        assert z.shape == (2, 4, 8, 8) and vae.factor == 2
        assert torch.allclose(z, (mode - 0.1) * 0.5, atol=1e-5)  # (z − shift_factor)·scaling_factor
        assert torch.allclose(vae.decode(z), raw.decode(mode).sample.clamp(-1, 1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        encoders.load_autoencoder(tmp_path)


# ----------------------------------------------------------------------------------------------
# Memory at scale: the text encoder's cache is bounded and off the GPU; a cached run loads no encoder
# ----------------------------------------------------------------------------------------------


def test_text_cache_is_bounded_and_evicted_prompts_encode_the_same(encoder_dir):
    """mT5 states are 4 MiB per caption: a run over a real caption set kept every one on the device
    forever. The cache keeps its most recent entries within a byte budget, on the CPU."""
    encoder = encoders.TextEncoder(encoder_dir, 16, cache_bytes=10 * 16 * 32 * 4)  # about 10 prompts
    prompts = [f"a photo of {n} squares" for n in range(40)]
    first = encoder.encode(prompts)
    assert sum(s.nbytes + p.nbytes for s, p in encoder.cache.values()) <= 10 * 16 * 32 * 4 < 40 * 16 * 32 * 4
    assert all(s.device.type == "cpu" for s, _ in encoder.cache.values())
    again = encoder.encode(prompts)  # most of them re-encoded after eviction
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_lazy_text_encoder_loads_weights_only_to_encode_and_releases_them(encoder_dir):
    """With --cache the text states come from the cache: the encoders are needed only for the
    sample grids' prompts, so they load then and are freed (not held on the GPU all run)."""
    eager = encoders.TextEncoder(encoder_dir, 16)
    lazy = encoders.TextEncoder(encoder_dir, 16, lazy=True)
    assert lazy.model is None and lazy.identity() == eager.identity()
    lazy.keep_only(["a red circle", ""])
    assert lazy.model is None  # encoded, then released
    assert torch.equal(lazy.encode(["a red circle"])[0], eager.encode(["a red circle"])[0])
    assert lazy.model is None  # a cached prompt needs no weights
