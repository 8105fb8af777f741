"""Flax ports of the diffusers/transformers modules that Stable Diffusion uses.

All image tensors are NHWC inside these modules; param names mirror the
diffusers module paths (the Flax module named ``down_blocks.0`` is diffusers' ``down_blocks.0``)
so that ``swiftbrush_jax.files.weights`` converts by rule, not by table.
"""

import os

from ..files import storage
from ..files.weights import WeightsError


class UnsupportedConfigError(ValueError):
    """A config.json option this port does not implement; the message names it."""


def read_config(folder: str) -> dict:
    """A component folder's ``config.json``; a missing or malformed file is a WeightsError naming it."""
    return storage.read_json(os.path.join(folder, "config.json"), WeightsError)
