"""NAMI's BridgeFlow as a diffusers model: the map x̂_s = W_k·Up(x̂_e^(k−1)) + B_k that carries the end of stage k−1
across the upsampling jump to the start of stage k (Ma et al., 2025, §3.3), from bridgeflow.py, with diffusers'
ModelMixin and ConfigMixin. Its config.json holds the latent channels and the stage sizes it was trained at; its
weights keep the release's names (scale, shift.0, shift.1, ...).

training/export.py (the nami repository) copies this file into the bridge_flow/ folder of an exported pipeline,
beside copies of bridgeflow.py and nami.py; diffusers imports it from there when the pipeline is loaded with
trust_remote_code=True. It is not imported inside the repository.
"""
from __future__ import annotations

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .bridgeflow import BridgeFlow
# bridgeflow.py's own import, named here as well: diffusers copies into its module cache only the files that the file
# it loads imports, not theirs, and bridgeflow.py needs nami.py beside it
from .nami import up  # noqa: F401


class NamiBridgeFlow(BridgeFlow, ModelMixin, ConfigMixin):
    """bridgeflow.BridgeFlow with diffusers' loading and saving: forward(x, k) upsamples an end point of stage k−1
    and applies jump k's affine map, at any size (its bias maps resized bilinearly, docs/method.md §4).
    stage_sizes: [(H_k, W_k)] of the latents at stages k = 1..K when it was trained (the bias maps are those of
    stages 2..K; a flat model's single stage has none); per_channel: one bias per channel instead of a map."""
    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: int, stage_sizes, per_channel: bool = False):
        BridgeFlow.__init__(self, channels, [tuple(size) for size in stage_sizes], per_channel)
