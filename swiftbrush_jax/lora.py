"""LoRA adapters as a parameter tree of their own, laid over a frozen UNet tree.

The tree mirrors the UNet's module paths and holds, for each adapted
linear layer, ``down`` [in, rank] and ``up`` [rank, out]. ``layers.LoRADense``
picks them up from the ``lora`` variable collection, so the LoRA teacher is the
teacher's own parameters plus this small tree: no second copy of the weights.
Adaptable: the attention projections and the transformer blocks' other linear
layers (SUPPORTED_TARGETS); not the convolutions or the time embedding.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .errors import UsageError


# Linear layers of the UNet's transformer blocks, by the end of their diffusers module names: the attention
# projections, the feed-forward's two layers, and the projections in and out of each transformer (linear in SD
# 2.x; 1x1 convolutions in SD 1.x, which are not adapted).
SUPPORTED_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def adapted_paths(params, targets: Sequence[str]) -> list:
    """Module paths (tuples) of the linear layers whose names end with one of ``targets``."""
    unknown = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unknown:
        raise UsageError(f"LoRA targets {unknown} are not supported; choose from {', '.join(SUPPORTED_TARGETS)}")
    named = lambda path: ".".join(path).endswith(tuple("." + t for t in targets))
    flat = traverse_util.flatten_dict(params)
    paths = sorted({p[:-1] for p in flat if p[-1] == "kernel" and len(flat[p].shape) == 2 and named(p[:-1])})
    if not paths:
        raise UsageError(f"no linear layers named {list(targets)} in the UNet (1x1 convolutions are not adapted)")
    return paths


def init_lora(rng, params, rank: int, targets: Sequence[str] = ("to_q", "to_v"), dtype=jnp.float32):
    """Fresh adapters: ``down`` normal with std 1/rank, ``up`` zero, so the adapted net starts equal."""
    flat = traverse_util.flatten_dict(params)
    tree = {}
    paths = adapted_paths(params, targets)
    for path, key in zip(paths, jax.random.split(rng, len(paths))):
        fan_in, fan_out = flat[path + ("kernel",)].shape
        tree[path + ("down",)] = jax.random.normal(key, (fan_in, rank), dtype) / rank
        tree[path + ("up",)] = jnp.zeros((rank, fan_out), dtype)
    return traverse_util.unflatten_dict(tree)


def lora_scale(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def fold(params, lora, scale: float):
    """The UNet weights with every adapter merged in: kernel + scale * down @ up, what ``LoRADense`` computes
    (float32, numpy); the tree of a LoRA student made whole, for sampling and export."""
    flat = {path: np.asarray(value, np.float32) for path, value in traverse_util.flatten_dict(params).items()}
    adapters = traverse_util.flatten_dict(lora)
    for path in adapters:
        if path[-1] == "down":
            module = path[:-1]
            down, up = (np.asarray(adapters[module + (name,)], np.float32) for name in ("down", "up"))
            if module + ("kernel",) not in flat:
                raise ValueError(f"the adapter {'.'.join(module)} has no weight to merge into in this UNet")
            flat[module + ("kernel",)] = flat[module + ("kernel",)] + np.float32(scale) * (down @ up)
    return traverse_util.unflatten_dict(flat)


def to_diffusers_lora(lora, scale: float, prefix: str = "unet") -> dict:
    """Adapters in the PEFT layout diffusers' ``load_lora_weights`` reads: ``<prefix>.<module>.lora_A.weight``
    [rank, in] and ``lora_B.weight`` [out, rank], numpy float32. The scale is folded into B, since diffusers
    applies alpha / rank = 1 to a state dict that names no alpha."""
    flat = traverse_util.flatten_dict(lora)
    out = {}
    for path in flat:
        if path[-1] == "down":
            name = ".".join((prefix,) + path[:-1])
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(flat[path], np.float32).T)
            up = np.float32(scale) * np.asarray(flat[path[:-1] + ("up",)], np.float32)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(up.T)
    return out
