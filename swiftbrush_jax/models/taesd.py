"""The tiny autoencoder TAESD (diffusers' ``AutoencoderTiny``) in Flax, loaded from a diffusers folder.

SwiftBrush v2's CLIP loss decodes the student's x0 to pixels inside the train
step (docs/method.md §6); TAESD does that in a few percent of the SD VAE
decoder's cost. It is plain 3x3 convolutions, ReLU residual blocks and
nearest-neighbour upsampling. The decoder takes the latents the UNet sees
(SD's, already multiplied by its scaling factor: TAESD's own factor is 1) and
first soft-clamps them to +-3 with 3 tanh(z / 3); the encoder takes images in
[-1, 1]. Module names mirror diffusers' (``decoder.layers.N`` of its
``nn.Sequential``), so parameter paths joined by dots are its state-dict keys.
"""

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..files.weights import read_state_dict, state_dict_to_params
from . import UnsupportedConfigError, read_config


@dataclasses.dataclass(frozen=True)
class TAESDConfig:
    """The fields of diffusers' ``AutoencoderTiny`` config.json (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: Tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: Tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: Tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: Tuple[int, ...] = (3, 3, 3, 1)
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    scaling_factor: float = 1.0

    @classmethod
    def from_diffusers(cls, d: dict) -> "TAESDConfig":
        for key, supported in (("act_fn", "relu"), ("upsample_fn", "nearest")):
            if d.get(key, supported) != supported:
                raise UnsupportedConfigError(f"TAESD config.json: {key}={d[key]!r} is not supported (only {supported!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def conv(features: int, name: str, stride: int = 1, bias: bool = True, kernel: int = 3, dtype=jnp.float32):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=[(kernel // 2, kernel // 2)] * 2,
                   use_bias=bias, dtype=dtype, name=name)


class TinyBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + skip(x)), skip a bias-free 1x1 convolution where channels change."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(conv(self.features, "conv.0", dtype=self.dtype)(x))
        h = jax.nn.relu(conv(self.features, "conv.2", dtype=self.dtype)(h))
        h = conv(self.features, "conv.4", dtype=self.dtype)(h)
        skip = x if x.shape[-1] == self.features else conv(self.features, "skip", bias=False, kernel=1,
                                                           dtype=self.dtype)(x)
        return jax.nn.relu(h + skip)


class TinyEncoder(nn.Module):
    """Images in [-1, 1] (NHWC) -> latents: per level a convolution (strided after the first) and its residual
    blocks, then a convolution to the latent channels."""

    config: TAESDConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = (x + 1.0) / 2.0
        index = 0
        for level, (channels, blocks) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            first = level == 0
            x = conv(channels, f"layers.{index}", stride=1 if first else 2, bias=first, dtype=self.dtype)(x)
            index += 1
            for _ in range(blocks):
                x = TinyBlock(channels, self.dtype, name=f"layers.{index}")(x)
                index += 1
        return conv(cfg.latent_channels, f"layers.{index}", dtype=self.dtype)(x)


class TinyDecoder(nn.Module):
    """Latents (NHWC) -> images in [-1, 1]: soft clamp, convolution, per level residual blocks and upsampling."""

    config: TAESDConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        x = jnp.tanh(z / 3.0) * 3.0
        x = jax.nn.relu(conv(cfg.decoder_block_out_channels[0], "layers.0", dtype=self.dtype)(x))
        index = 2
        last = len(cfg.num_decoder_blocks) - 1
        for level, (channels, blocks) in enumerate(zip(cfg.decoder_block_out_channels, cfg.num_decoder_blocks)):
            for _ in range(blocks):
                x = TinyBlock(channels, self.dtype, name=f"layers.{index}")(x)
                index += 1
            if level != last:
                factor = cfg.upsampling_scaling_factor
                x = x.repeat(factor, axis=1).repeat(factor, axis=2)
                index += 1
            x = conv(channels if level != last else cfg.out_channels, f"layers.{index}", bias=level == last,
                     dtype=self.dtype)(x)
            index += 1
        return x * 2.0 - 1.0


class AutoencoderTiny(nn.Module):
    """``encode`` (images in [-1, 1] -> latents) and ``decode`` (latents -> images in [-1, 1]), NHWC."""

    config: TAESDConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.encoder = TinyEncoder(self.config, self.dtype)
        self.decoder = TinyDecoder(self.config, self.dtype)

    def encode(self, images):
        return self.encoder(images).astype(jnp.float32)

    def decode(self, latents):
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images):
        return self.decode(self.encode(images))


def taesd_from_config(config: dict, dtype=jnp.float32):
    """(model, parameter shapes) of a diffusers ``AutoencoderTiny`` config.json dict; nothing is allocated."""
    parsed = TAESDConfig.from_diffusers(config)
    model = AutoencoderTiny(parsed, dtype=dtype)
    images = jax.ShapeDtypeStruct((1, 64, 64, parsed.in_channels), jnp.float32)
    return model, jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def load_taesd(folder: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, params) from a diffusers ``AutoencoderTiny`` folder (config.json + safetensors)."""
    model, shapes = taesd_from_config(read_config(folder), dtype)
    return model, state_dict_to_params(read_state_dict(folder), shapes, "TAESD", param_dtype)
