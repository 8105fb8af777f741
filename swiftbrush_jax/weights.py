"""Conversion between diffusers/transformers safetensors and our Flax parameter trees.

The Flax modules are named after the PyTorch module paths, so a parameter's
PyTorch name is its Flax path joined by dots, with the leaf renamed:

    Flax leaf     PyTorch leaf   layout change
    kernel (4D)   weight         HWIO -> OIHW
    kernel (2D)   weight         [in, out] -> [out, in]
    scale         weight         none (norms)
    embedding     weight         none (embeddings)
    bias          bias           none

Weights are only ever read from safetensors; pickle checkpoints are refused.
"""

import json
import os
import re
from typing import Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.flax import load_file
from safetensors.numpy import save_file

# Files a component folder may hold its weights in, in order of preference.
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Non-parameter buffers some checkpoints carry.
IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")


class WeightsError(ValueError):
    """Weights on disk that cannot be mapped onto the model; the message names each tensor."""


def find_safetensors(folder: str) -> list:
    """The safetensors files of one component folder (single file or sharded index)."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: no such folder; point to a diffusers pipeline folder or a Hub id")
    for name in SAFETENSORS_NAMES:
        index = os.path.join(folder, name + ".index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
        if os.path.exists(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    pickles = [n for n in sorted(os.listdir(folder)) if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise WeightsError(
            f"{os.path.join(folder, pickles[0])} is a pickle checkpoint, which is never loaded (it can run code); "
            "convert it once with diffusers: `Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`"
        )
    raise WeightsError(f"{folder}: no {' or '.join(SAFETENSORS_NAMES)} found")


def read_state_dict(folder: str) -> Dict[str, np.ndarray]:
    """All tensors of a component folder as numpy arrays."""
    state = {}
    for path in find_safetensors(folder):
        try:
            tensors = load_file(path)  # the flax reader, unlike the numpy one, handles bfloat16
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
        state.update({k: np.asarray(v) for k, v in tensors.items()})
    return {k: v for k, v in state.items() if not IGNORED_KEYS.search(k)}


def torch_name(path: tuple) -> str:
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
    return ".".join(path[:-1] + (leaf,))


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _fmt(names, limit=12):
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def state_dict_to_params(
    state: Mapping[str, np.ndarray],
    shapes,
    what: str,
    dtype=jnp.float32,
    adapt: Optional[Callable[[str, np.ndarray, tuple], np.ndarray]] = None,
):
    """Map a PyTorch state dict onto a Flax params tree with the structure of ``shapes``.

    ``shapes`` is the tree ``jax.eval_shape(model.init, ...)["params"]`` gives.
    ``adapt(name, tensor, flax_shape)`` may reshape legacy layouts before the
    check. Every missing, unexpected and mis-shaped tensor is named in a single
    ``WeightsError``.
    """
    flat = traverse_util.flatten_dict(shapes)
    out, missing, wrong = {}, [], []
    used = set()
    for path, spec in flat.items():
        name = torch_name(path)
        if name not in state:
            missing.append(name)
            continue
        used.add(name)
        value = state[name]
        if adapt is not None:
            value = adapt(name, value, tuple(spec.shape))
        value = to_flax_layout(path[-1], np.asarray(value))
        if value.shape != tuple(spec.shape):
            wrong.append(f"{name} {tuple(to_torch_layout(path[-1], value).shape)} != expected "
                         f"{tuple(to_torch_layout(path[-1], np.empty(spec.shape, np.int8)).shape)}")
            continue
        out[path] = value
    unexpected = sorted(set(state) - used)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_fmt(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} mis-shaped: {_fmt(wrong)}")
        raise WeightsError(f"{what} weights do not match its config.json ({'; '.join(parts)})")
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), traverse_util.unflatten_dict(out))


def params_to_state_dict(params, dtype=np.float32) -> Dict[str, np.ndarray]:
    """The inverse of ``state_dict_to_params``: a PyTorch-layout dict of numpy arrays."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {
        torch_name(path): np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(v, dtype)))
        for path, v in flat.items()
    }


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    save_file(dict(state), path, metadata={"format": "pt"})
