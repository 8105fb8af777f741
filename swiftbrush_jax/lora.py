"""LoRA adapters as a parameter tree of their own, laid over a frozen UNet tree.

The tree mirrors the UNet's module paths and holds, for each adapted
linear layer or 1x1 convolution, ``down`` [in, rank] and ``up`` [rank, out].
``layers.LoRADense`` picks them up from the ``lora`` variable collection, so the
LoRA teacher is the teacher's own parameters plus this small tree: no second
copy of the weights. Adaptable (SUPPORTED_TARGETS): the attention projections,
the transformer blocks' other linear layers, and, as options, the resnets' 1x1
shortcut convolutions and time projections and the time embedding's linear
layers; not the 3x3 convolutions.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .errors import UsageError


# The UNet's linear layers and 1x1 convolutions, by the end of their diffusers module names: in the transformer
# blocks, the attention projections, the feed-forward's two layers and the projections in and out of each
# transformer (linear in SD 2.x, 1x1 convolutions in SD 1.x); in the resnets, the shortcut convolution (where the
# channels change) and the projection of the time embedding; and the time embedding's two layers.
SUPPORTED_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                     "conv_shortcut", "time_emb_proj", "time_embedding.linear_1", "time_embedding.linear_2")


def _pointwise(kernel_shape) -> bool:
    """A kernel a low-rank update can join: a linear layer's [in, out] or a 1x1 convolution's [1, 1, in, out]."""
    return len(kernel_shape) == 2 or (len(kernel_shape) == 4 and tuple(kernel_shape[:2]) == (1, 1))


def adapted_paths(params, targets: Sequence[str]) -> list:
    """Module paths (tuples) of the linear layers and 1x1 convolutions whose names end with one of ``targets``."""
    unknown = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unknown:
        raise UsageError(f"LoRA targets {unknown} are not supported; choose from {', '.join(SUPPORTED_TARGETS)}")
    named = lambda path: ("." + ".".join(path)).endswith(tuple("." + t for t in targets))
    flat = traverse_util.flatten_dict(params)
    paths = sorted({p[:-1] for p in flat if p[-1] == "kernel" and _pointwise(flat[p].shape) and named(p[:-1])})
    if not paths:
        raise UsageError(f"no linear layers or 1x1 convolutions named {list(targets)} in the UNet")
    return paths


def init_lora(rng, params, rank: int, targets: Sequence[str] = ("to_q", "to_v"), dtype=jnp.float32):
    """Fresh adapters: ``down`` normal with std 1/rank, ``up`` zero, so the adapted net starts equal."""
    flat = traverse_util.flatten_dict(params)
    tree = {}
    paths = adapted_paths(params, targets)
    for path, key in zip(paths, jax.random.split(rng, len(paths))):
        fan_in, fan_out = flat[path + ("kernel",)].shape[-2:]
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
            kernel = flat[module + ("kernel",)]
            flat[module + ("kernel",)] = kernel + np.float32(scale) * (down @ up).reshape(kernel.shape)
    return traverse_util.unflatten_dict(flat)


def to_diffusers_lora(lora, params, scale: float, prefix: str = "unet") -> dict:
    """Adapters in the PEFT layout diffusers' ``load_lora_weights`` reads: ``<prefix>.<module>.lora_A.weight``
    [rank, in] and ``lora_B.weight`` [out, rank] (with trailing 1x1 dimensions where ``params``, the UNet they
    adapt, holds a 1x1 convolution, as PEFT's adapted convolutions are), numpy float32. The scale is folded into
    B, since diffusers applies alpha / rank = 1 to a state dict that names no alpha."""
    flat, kernels = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(params)
    out = {}
    for path in flat:
        if path[-1] == "down":
            name = ".".join((prefix,) + path[:-1])
            spatial = (1, 1) if len(kernels[path[:-1] + ("kernel",)].shape) == 4 else ()
            down = np.asarray(flat[path], np.float32).T
            up = (np.float32(scale) * np.asarray(flat[path[:-1] + ("up",)], np.float32)).T
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(down.reshape(down.shape + spatial))
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(up.reshape(up.shape + spatial))
    return out
