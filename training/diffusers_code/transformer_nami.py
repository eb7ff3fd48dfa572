"""NAMI's transformer as a diffusers model: the progressive MM-DiT of nami.py (Ma et al., 2025, §3.2, §4.1) with
diffusers' ModelMixin and ConfigMixin, so that from_pretrained, save_pretrained, torch_dtype and CPU offloading
work on it. Its config.json holds the fields of nami.NamiConfig; its weights keep nami.py's names, which are those
of diffusers' FluxTransformer2DModel.

training/export.py (the nami repository, a plain-PyTorch reference of the paper) copies this file into the
transformer/ folder of an exported pipeline, beside a copy of nami.py; diffusers imports it from there when the
pipeline is loaded with trust_remote_code=True. It is not imported inside the repository.
"""
from __future__ import annotations

import inspect
from dataclasses import fields

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .nami import Nami, NamiConfig


class NamiTransformer2DModel(Nami, ModelMixin, ConfigMixin):
    """nami.Nami with diffusers' loading and saving. Nami comes first among the bases, so that its forward and its
    initialisation are the model's; ModelMixin adds from_pretrained, dtype, device and the offloading hooks."""
    config_name = "config.json"
    _no_split_modules = ["DoubleStreamBlock", "SingleStreamBlock"]

    def __init__(self, **config):
        Nami.__init__(self, NamiConfig(**config))

    # diffusers reads a model's config fields from the signature of its __init__: give it NamiConfig's fields with
    # their defaults, so that they are written once (nami.py) and config.json holds exactly them
    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default)
           for field in fields(NamiConfig)])
    __init__ = register_to_config(__init__)
