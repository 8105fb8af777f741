"""CLIP as an image-text scorer in Flax: both towers with their projections, loaded from a transformers folder.

SwiftBrush v2's clamped CLIP loss (docs/method.md §6) needs the cosine between
the embedding of a generated image and that of its prompt, differentiated
through the image tower into the student. The text tower is the one of
``models.clip`` (the SD text encoder) pooled at the first end-of-text token
and projected; the vision tower is a ViT: patches by a strided convolution,
a class token and learned positions, a pre-norm, the same encoder blocks
without the causal mask, the class token's post-norm and projection. The
module tree mirrors transformers' ``CLIPModel``, so parameter paths joined by
dots are its state-dict keys (OpenCLIP checkpoints convert to that layout with
``evaluators.clip_scorers.openclip_to_transformers``).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..files.weights import read_state_dict, state_dict_to_params
from . import UnsupportedConfigError, read_config
from .text_encoder import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer, config_from_transformers, layer_norm

# Tensors of a CLIPModel checkpoint that the cosine does not use.
UNUSED_KEYS = ("logit_scale",)

# OpenAI CLIP's pixel normalisation, which OpenCLIP's LAION models and HPSv2 keep.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``vision_config`` (defaults are transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPVisionConfig":
        return config_from_transformers(cls, d, "vision_config")


class CLIPVisionEmbeddings(nn.Module):
    """Non-overlapping patches (a bias-free strided convolution), a learned class token, learned positions."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixels)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)  # row-major, as torch's flatten(2)
        class_token = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        tokens = jnp.concatenate(
            [jnp.broadcast_to(class_token.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size)), patches],
            axis=1)
        positions = nn.Embed(tokens.shape[1], cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(tokens.shape[1])[None])
        return tokens + positions


class CLIPVisionTransformer(nn.Module):
    """transformers' ``vision_model``: pixels (B, H, W, 3), normalised -> pooled class token (B, hidden)."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)  # sic: transformers' name
        x = CLIPEncoder(cfg, self.dtype, causal=False, name="encoder")(x)
        return layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """Projected CLIP embeddings: ``image_features`` of normalised NHWC pixels, ``text_features`` of token ids.

    ``__call__`` gives both, for ``init``.
    """

    text_config: CLIPTextConfig
    vision_config: CLIPVisionConfig
    projection_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextTransformer(self.text_config, self.dtype)
        self.vision_model = CLIPVisionTransformer(self.vision_config, self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

    def text_features(self, input_ids):
        hidden = self.text_model(input_ids)
        # transformers pools at the first end-of-text token (the largest id, for checkpoints whose
        # eos_token_id is the legacy 2).
        eos = self.text_config.eos_token_id
        position = jnp.argmax(input_ids, -1) if eos == 2 else jnp.argmax(input_ids == eos, -1)
        pooled = hidden[jnp.arange(hidden.shape[0]), position]
        return self.text_projection(pooled).astype(jnp.float32)

    def __call__(self, pixels, input_ids):
        return self.image_features(pixels), self.text_features(input_ids)


def cosine(image_features, text_features):
    """Row-wise cosine similarity of two (B, D) embeddings."""
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return jnp.sum(unit(image_features) * unit(text_features), axis=-1)


def clip_pixels(images, size: int):
    """Images in [-1, 1] (NHWC) as the CLIP image tower takes them: resized to size x size (bilinear,
    antialiased when shrinking, as torch's ``interpolate(..., antialias=True)``), CLIP-normalised.
    Differentiable, for a loss on generated images."""
    images = (images.astype(jnp.float32) + 1.0) / 2.0
    if images.shape[1:3] != (size, size):
        images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear", antialias=True)
    return (images - CLIP_MEAN) / CLIP_STD


def clip_model_from_config(config: dict, dtype=jnp.float32, where: str = "CLIPModel config"):
    """(model, parameter shapes) of a transformers ``CLIPModel`` config.json dict; nothing is allocated."""
    if "text_config" not in config or "vision_config" not in config:
        raise UnsupportedConfigError(f"{where} is not a CLIPModel config (no text_config/vision_config)")
    text = CLIPTextConfig.from_transformers(config["text_config"])
    vision = CLIPVisionConfig.from_transformers(config["vision_config"])
    model = CLIPModel(text, vision, config.get("projection_dim", 512), dtype=dtype)
    pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
    return model, jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]


def load_clip_model(folder: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, params) from a transformers ``CLIPModel`` folder (config.json + safetensors)."""
    model, shapes = clip_model_from_config(read_config(folder), dtype, f"{folder}/config.json")
    state = {k: v for k, v in read_state_dict(folder).items() if k not in UNUSED_KEYS}
    return model, state_dict_to_params(state, shapes, "CLIP", param_dtype)
