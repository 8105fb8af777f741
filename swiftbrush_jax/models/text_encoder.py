"""The CLIP text encoder of Stable Diffusion in Flax, loaded from a transformers ``text_encoder`` folder.

Only ``last_hidden_state`` is computed: SD pipelines feed it to the UNet's
cross-attention and never use the pooled output or the projection.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..files.weights import read_state_dict, state_dict_to_params
from . import UnsupportedConfigError, read_config

# transformers' "gelu" is the exact erf form; "quick_gelu" is OpenAI's sigmoid approximation.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# The single child of CLIPTextModel, as in transformers < 5 and every SD checkpoint on the Hub.
TEXT_MODEL = "text_model"


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' ``text_encoder/config.json`` (defaults are transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Not used by the model; kept so an exported config.json round-trips.
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPTextConfig":
        return config_from_transformers(cls, d, "text_encoder config.json")

    def to_transformers(self) -> dict:
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


def config_from_transformers(cls, d: dict, what: str):
    """A CLIP tower's config dataclass from transformers' dict: its own fields, a supported activation."""
    act = d.get("hidden_act", cls.hidden_act)
    if act not in ACTIVATIONS:
        raise UnsupportedConfigError(f"{what}: hidden_act={act!r} is not supported (only {sorted(ACTIVATIONS)})")
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    """torch.nn.LayerNorm; two-pass variance, since the one-pass form loses digits on CLIP's large activations."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[1])[None])
        return tokens + positions


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; causal in the text tower."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        heads = cfg.num_attention_heads
        proj = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, cfg.hidden_size // heads)
        q, k, v = (split(proj(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return proj("out_proj")(out.reshape(x.shape))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig  # or models.clip.CLIPVisionConfig: the fields used here are common to both
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.dtype, self.causal, name="self_attn")(h)
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="mlp.fc1")(h)
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="mlp.fc2")(ACTIVATIONS[cfg.hidden_act](h))
        return x + h


class CLIPEncoder(nn.Module):
    """The stack of ``layers.N``; SD 2.x checkpoints ship 23 of OpenCLIP's 24 (the penultimate output)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.causal, name=f"layers.{i}")(x)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder, final layer norm: transformers' ``text_model``."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        x = CLIPEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(cfg, self.dtype, name="encoder")(x)
        return layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)


class CLIPTextModel(nn.Module):
    """input_ids (B, L) int32 -> last_hidden_state (B, L, hidden_size) float32.

    The single ``text_model`` child mirrors the module tree of SD checkpoints on
    the Hub, so param paths joined by dots are their state-dict keys.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed max_position_embeddings={self.config.max_position_embeddings}"
            )
        return CLIPTextTransformer(self.config, self.dtype, name=TEXT_MODEL)(input_ids).astype(jnp.float32)


def with_text_model_prefix(state: dict) -> dict:
    """Both on-disk layouts, mapped to our module tree.

    SD checkpoints on the Hub (transformers < 5) prefix every key with
    ``text_model.``; transformers 5 saves CLIPTextModel without it.
    """
    return {k if k.startswith(f"{TEXT_MODEL}.") else f"{TEXT_MODEL}.{k}": v for k, v in state.items()}


def load_text_encoder(folder: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, params) from a transformers ``text_encoder`` folder (config.json + safetensors)."""
    config = CLIPTextConfig.from_transformers(read_config(folder))
    model = CLIPTextModel(config, dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    state = with_text_model_prefix(read_state_dict(folder))
    params = state_dict_to_params(state, shapes, "text_encoder", param_dtype)
    return model, params
