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
from ml_dtypes import bfloat16
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


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": bfloat16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of one safetensors file as a numpy array in host memory (bfloat16 through ml_dtypes).

    The format is a little-endian u64 header length, a JSON header of {name: dtype, shape, data_offsets}
    and the raw bytes; reading it here keeps the weights off every accelerator until the trainer places
    them (the library's readers for bfloat16 go through a framework's device arrays)."""
    try:
        with open(path, "rb") as f:
            header_size = int(np.frombuffer(f.read(8), "<u8")[0])
            header = json.loads(f.read(header_size))
            body = f.read()
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
            if end > len(body) or end - start != dtype.itemsize * int(np.prod(info["shape"])):
                raise ValueError(f"tensor {name} runs past the end of the file or has the wrong size")
            out[name] = np.frombuffer(body, dtype, count=(end - start) // dtype.itemsize,
                                      offset=start).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_state_dict(folder: str) -> Dict[str, np.ndarray]:
    """All tensors of a component folder as numpy arrays."""
    state = {}
    for path in find_safetensors(folder):
        state.update(read_safetensors(path))
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
    # Host (numpy) arrays: the trainer casts and shards them onto the mesh itself, so that no device ever
    # holds a whole float32 copy it does not need.
    return jax.tree_util.tree_map(lambda v: np.asarray(v, dtype), traverse_util.unflatten_dict(out))


def params_to_state_dict(params, dtype=np.float32) -> Dict[str, np.ndarray]:
    """The inverse of ``state_dict_to_params``: a PyTorch-layout dict of numpy arrays."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {
        torch_name(path): np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(v, dtype)))
        for path, v in flat.items()
    }


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    save_file(dict(state), path, metadata={"format": "pt"})
