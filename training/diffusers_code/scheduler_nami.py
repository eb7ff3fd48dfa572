"""NAMI's time axis as a diffusers scheduler: the K stage windows [s_k → e_k] with Pyramid Flow's corrected starts
and the global time τ of each (Ma et al., 2025, §3.2; docs/method.md §2), and the Euler grid of each stage, ours
(uniform in local time) or the authors' release's (Pyramid Flow's scheduler over a 1000-step table,
docs/method.md §6), for the steps a call asks for. Its scheduler_config.json holds the window ratios, γ, the grid
and the default steps per stage; the windows and τ ranges are written there too, for readers, and checked.

training/export.py (the nami repository) copies this file into the scheduler/ folder of an exported pipeline,
beside copies of nami.py and of the repository's training/schedules.py; diffusers imports it from there when the
pipeline is loaded with trust_remote_code=True. It is not imported inside the repository.
"""
from __future__ import annotations

import math

from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config

from .nami import stage_windows
from .nami import tau_ranges as stage_tau_ranges  # `tau_ranges` names a field of the config below
from .schedules import SCHEDULES


class NamiScheduler(SchedulerMixin, ConfigMixin):
    """grids(steps, ratios, gamma) is nami.sampling_plan's `schedule`: one nami.StageGrid (local times t' from 1 to
    0, the τ of each step) per stage, from SCHEDULES[schedule]. NAMI's sampler is nami.generate; this holds no state
    between steps, unlike diffusers' step-by-step schedulers."""
    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, window_ratios=(1.0, 1.0, 1.0), gamma: float = 1 / 3, schedule: str = "uniform",
                 num_inference_steps=(10, 10, 10), windows=None, tau_ranges=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"scheduler_config.json: schedule {schedule!r} is not one of {sorted(SCHEDULES)}")
        if len(num_inference_steps) != len(window_ratios) or min(num_inference_steps) < 1:
            raise ValueError(f"scheduler_config.json: num_inference_steps {list(num_inference_steps)} must give "
                             f"one positive count per stage ({len(window_ratios)} stages)")
        # the windows and τ ranges follow from the ratios and γ; a copy edited by hand would say what is not computed
        for name, given, computed in (("windows", windows, stage_windows(window_ratios, gamma)),
                                      ("tau_ranges", tau_ranges, stage_tau_ranges(window_ratios, gamma))):
            if given is not None and differs(given, computed):
                raise ValueError(f"scheduler_config.json: {name} {given} do not follow from window_ratios "
                                 f"{list(window_ratios)} and gamma {gamma} ({computed}); they are written for readers: "
                                 "change window_ratios (and the transformer's) instead")

    def grids(self, steps, ratios, gamma):
        """Each stage's Euler grid for `steps` per stage, on the windows of `ratios` and γ."""
        return SCHEDULES[self.config.schedule](steps, ratios, gamma)


def differs(given, computed) -> bool:
    """Two lists of (start, end) pairs that are not the same to 1e-9."""
    return len(given) != len(computed) or any(len(pair) != 2 or not all(math.isclose(a, b, abs_tol=1e-9)
                                                                        for a, b in zip(pair, want))
                                              for pair, want in zip(given, computed))
