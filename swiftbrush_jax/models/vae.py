"""Stable Diffusion's AutoencoderKL in Flax (NHWC), loaded from a diffusers ``vae`` folder.

SwiftBrush only needs the VAE to turn the student's latents into images (and,
for evaluation or v2's CLIP loss, images into latents); it is never trained.
"""

import dataclasses
import re
from typing import Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..files.weights import read_state_dict, state_dict_to_params
from . import UnsupportedConfigError, read_config
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

# diffusers hard-codes this epsilon for every norm inside the VAE.
VAE_EPS = 1e-6
# The range diffusers' DiagonalGaussianDistribution clamps the log-variance to.
LOGVAR_RANGE = (-30.0, 20.0)

# Options of diffusers' AutoencoderKL that this port implements only at one value.
FIXED_OPTIONS = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


def _unsupported(key, value) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"vae config.json: {key}={value!r} is not supported by this port")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``vae/config.json`` that shape the model (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, ...]] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        for key, supported in FIXED_OPTIONS.items():
            value = d.get(key, supported)
            if value != supported:
                raise _unsupported(key, value)
        channels = tuple(d.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = list(d.get(key, [block]))
            if types != [block] * len(channels):
                raise _unsupported(key, types)
        sample_size = d.get("sample_size", cls.sample_size)
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        fields.update(
            block_out_channels=channels,
            sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
        )
        return cls(**fields)

    def to_diffusers(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        if isinstance(self.sample_size, tuple):
            d["sample_size"] = list(self.sample_size)
        d.update(FIXED_OPTIONS)
        d["down_block_types"] = [DOWN_BLOCK] * len(self.block_out_channels)
        d["up_block_types"] = [UP_BLOCK] * len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **d}


class MidBlockAttention(nn.Module):
    """The VAE's single-head spatial self-attention: GroupNorm, attention over all pixels, residual.

    The inner ``Attention`` shares this module's scope so its ``to_q`` ... ``to_out.0``
    sit next to ``group_norm``, exactly as in diffusers.
    """

    channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.group_norm = group_norm(self.groups, VAE_EPS, self.dtype)
        self.attention = Attention(heads=1, dim_head=self.channels, qkv_bias=True, upcast=True, dtype=self.dtype)
        nn.share_scope(self, self.attention)

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return x + self.attention(tokens).reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
    """resnet, attention, resnet at the lowest resolution of encoder and decoder."""

    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, VAE_EPS, dtype=self.dtype, name="resnets.0")(x)
        x = MidBlockAttention(c, self.groups, self.dtype, name="attentions.0")(x)
        return ResnetBlock2D(c, self.groups, VAE_EPS, dtype=self.dtype, name="resnets.1")(x)


class DownEncoderBlock2D(nn.Module):
    """Resnets at one resolution, then (except at the bottom) a stride-2 asymmetric-pad conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets.{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, asymmetric=True, dtype=self.dtype, name="downsamplers.0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets at one resolution, then (except at the top) nearest 2x upsampling and a conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets.{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers.0")(x)
        return x


class Encoder(nn.Module):
    """Image -> the 2 x latent_channels Gaussian moments (before ``quant_conv``)."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, self.dtype, name="conv_in")(x)
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            block = DownEncoderBlock2D(c, cfg.layers_per_block, cfg.norm_num_groups, not last, self.dtype,
                                       name=f"down_blocks.{i}")
            x = block(x)
        x = UNetMidBlock2D(cfg.norm_num_groups, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (after ``post_quant_conv``) -> image."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], 3, self.dtype, name="conv_in")(z)
        x = UNetMidBlock2D(cfg.norm_num_groups, self.dtype, name="mid_block")(x)
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            block = UpDecoderBlock2D(c, cfg.layers_per_block + 1, cfg.norm_num_groups, not last, self.dtype,
                                     name=f"up_blocks.{i}")
            x = block(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL on NHWC tensors; outputs are float32 whatever the compute dtype.

    Apply with ``method="encode"`` or ``method="decode"``; ``__call__`` (encode the
    mean, then decode it) exists so ``init`` and ``eval_shape`` see every parameter.
    Latents here are unscaled: multiply by ``config.scaling_factor`` for the UNet.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype)
        self.quant_conv = conv(2 * self.config.latent_channels, 1, self.dtype)
        self.post_quant_conv = conv(self.config.latent_channels, 1, self.dtype)

    def encode(self, x):
        """Image in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior over latents."""
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """Unscaled latents -> image in (about) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


# Old checkpoints name the mid-block attention projections after the original LDM code.
LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention(state: dict) -> dict:
    """Map ``query/key/value/proj_attn`` to diffusers' ``to_q/to_k/to_v/to_out.0`` names."""

    def rename(key):
        m = LEGACY_ATTENTION_KEY.match(key)
        return f"{m.group(1)}.{LEGACY_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}" if m else key

    return {rename(k): v for k, v in state.items()}


def squeeze_conv_projection(name: str, value: np.ndarray, flax_shape: tuple) -> np.ndarray:
    """Attention projections stored as 1x1 conv weights [out, in, 1, 1] become linear [out, in]."""
    if ".attentions." in name and len(flax_shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0]
    return value


def vae_param_shapes(config: VAEConfig, dtype=jnp.float32):
    """The VAE's parameter tree as ShapeDtypeStructs, without allocating it."""
    side = 2 ** (len(config.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, side, side, config.in_channels), dtype)
    return jax.eval_shape(AutoencoderKL(config, dtype=dtype).init, jax.random.key(0), sample)["params"]


def load_vae(folder: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, params) from a diffusers ``vae`` folder (config.json + safetensors), params in host memory."""
    config = VAEConfig.from_diffusers(read_config(folder))
    state = rename_legacy_attention(read_state_dict(folder))
    params = state_dict_to_params(state, vae_param_shapes(config, dtype), "vae", param_dtype,
                                  adapt=squeeze_conv_projection)
    return AutoencoderKL(config, dtype=dtype), params
