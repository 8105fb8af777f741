"""The CLIP text encoders of Stable Diffusion in Flax, loaded from a transformers ``text_encoder`` folder.

SD 1.x/2.x feed ``last_hidden_state`` of a ``CLIPTextModel`` to the UNet's
cross-attention. SDXL uses two encoders and the PENULTIMATE hidden state of
each (transformers' ``hidden_states[-2]``: the output of the second-to-last
layer, before the final layer norm), concatenated on the last axis; its second
encoder is a ``CLIPTextModelWithProjection`` whose ``text_embeds`` (the final
layer-normed state at the end-of-text token, through the bias-free
``text_projection``) is the UNet's pooled conditioning. ``load_text_encoder``
builds whichever class the folder's ``config.json`` names in ``architectures``.
"""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..files.weights import read_state_dict, state_dict_to_params
from . import UnsupportedConfigError, read_config
from .conditioning import SDXLConditioning, time_ids

# transformers' "gelu" is the exact erf form; "quick_gelu" is OpenAI's sigmoid approximation.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# The single child of CLIPTextModel, as in transformers < 5 and every SD checkpoint on the Hub.
TEXT_MODEL = "text_model"
WITH_PROJECTION = "CLIPTextModelWithProjection"
ARCHITECTURES = ("CLIPTextModel", WITH_PROJECTION)


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

    def to_transformers(self, architecture: str = "CLIPTextModel") -> dict:
        return {"architectures": [architecture], "model_type": "clip_text_model", **dataclasses.asdict(self)}


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
    """The stack of ``layers.N``; SD 2.x checkpoints ship 23 of OpenCLIP's 24 (the penultimate output).

    With ``with_penultimate`` it returns (last output, the input of the last layer): transformers'
    ``hidden_states[-1]`` and ``hidden_states[-2]``.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x, with_penultimate: bool = False):
        penultimate = x
        for i in range(self.config.num_hidden_layers):
            penultimate = x
            x = CLIPEncoderLayer(self.config, self.dtype, self.causal, name=f"layers.{i}")(x)
        return (x, penultimate) if with_penultimate else x


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder, final layer norm: transformers' ``text_model``.

    Returns ``last_hidden_state``, or with ``with_penultimate`` (``last_hidden_state``,
    ``hidden_states[-2]``), the latter without the final layer norm, as transformers gives it.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, with_penultimate: bool = False):
        cfg = self.config
        x = CLIPEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x, penultimate = CLIPEncoder(cfg, self.dtype, name="encoder")(x, with_penultimate=True)
        last = layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
        return (last, penultimate) if with_penultimate else last


def pool_at_eos(hidden, input_ids, eos_token_id: int):
    """transformers' ``pooler_output``: each row's state at its first end-of-text token; configs with the
    legacy ``eos_token_id`` 2 (SDXL's, OpenAI's CLIP) pool at the largest token id instead."""
    position = jnp.argmax(input_ids, -1) if eos_token_id == 2 else jnp.argmax(input_ids == eos_token_id, -1)
    return hidden[jnp.arange(hidden.shape[0]), position]


def _check_length(config: CLIPTextConfig, input_ids):
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{input_ids.shape[1]} tokens exceed max_position_embeddings={config.max_position_embeddings}")


class CLIPTextModel(nn.Module):
    """input_ids (B, L) int32 -> last_hidden_state (B, L, hidden_size) float32, or with ``penultimate``
    transformers' ``hidden_states[-2]`` (SDXL's context; no final layer norm).

    The single ``text_model`` child mirrors the module tree of SD checkpoints on
    the Hub, so param paths joined by dots are their state-dict keys.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    penultimate: bool = False

    @nn.compact
    def __call__(self, input_ids):
        _check_length(self.config, input_ids)
        last, penultimate = CLIPTextTransformer(self.config, self.dtype, name=TEXT_MODEL)(input_ids, True)
        return (penultimate if self.penultimate else last).astype(jnp.float32)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``): input_ids (B, L) int32 ->
    (hidden states (B, L, hidden_size), ``text_embeds`` (B, projection_dim)), both float32.

    The hidden states are ``last_hidden_state``, or with ``penultimate`` ``hidden_states[-2]``;
    ``text_embeds`` is always the final layer-normed state pooled at end-of-text, projected.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    penultimate: bool = False

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        _check_length(cfg, input_ids)
        last, penultimate = CLIPTextTransformer(cfg, self.dtype, name=TEXT_MODEL)(input_ids, True)
        pooled = pool_at_eos(last, input_ids, cfg.eos_token_id)
        text_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        hidden = penultimate if self.penultimate else last
        return hidden.astype(jnp.float32), text_embeds.astype(jnp.float32)


def with_text_model_prefix(state: dict) -> dict:
    """Both on-disk layouts, mapped to our module tree.

    SD checkpoints on the Hub (transformers < 5) prefix every key with
    ``text_model.``; transformers 5 saves CLIPTextModel without it.
    """
    return {k if k.startswith(f"{TEXT_MODEL}.") else f"{TEXT_MODEL}.{k}": v for k, v in state.items()}


def load_text_encoder(folder: str, dtype=jnp.float32, param_dtype=jnp.float32, penultimate: bool = False):
    """(model, params) from a transformers ``text_encoder`` folder (config.json + safetensors).

    The model is a ``CLIPTextModel`` or, when ``architectures`` says so (SDXL's ``text_encoder_2``),
    a ``CLIPTextModelWithProjection``; ``penultimate`` makes it return ``hidden_states[-2]``.
    """
    raw = read_config(folder)
    architectures = raw.get("architectures") or ["CLIPTextModel"]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise UnsupportedConfigError(f"{folder}/config.json: architectures={architectures!r} is not supported "
                                     f"(only {' or '.join(ARCHITECTURES)})")
    config = CLIPTextConfig.from_transformers(raw)
    with_projection = architectures[0] == WITH_PROJECTION
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config, dtype, penultimate)
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    state = read_state_dict(folder)
    # transformers saves CLIPTextModelWithProjection with its text_model. prefix in every version.
    state = state if with_projection else with_text_model_prefix(state)
    params = state_dict_to_params(state, shapes, "text_encoder", param_dtype)
    return model, params


class SDXLTextEncoders(nn.Module):
    """SDXL's prompt encoding as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does it (clip_skip None):
    input_ids (B, 2, L), one row per tokenizer -> ``SDXLConditioning``: both encoders' penultimate hidden states
    joined on the last axis, text_encoder_2's ``text_embeds``, and the default time ids of ``image_size``
    (h, w pixels; set it, with ``clone``, to the size of the images the conditioning is for). Its parameters
    are {"text_encoder": ..., "text_encoder_2": ...}, the folders' names."""

    config: CLIPTextConfig
    config_2: CLIPTextConfig
    image_size: Optional[tuple] = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        if self.image_size is None:
            raise ValueError("SDXLTextEncoders needs image_size (h, w) for the time ids; clone(image_size=...)")
        first = CLIPTextModel(self.config, self.dtype, penultimate=True, name="text_encoder")(input_ids[:, 0])
        second, text_embeds = CLIPTextModelWithProjection(self.config_2, self.dtype, penultimate=True,
                                                          name="text_encoder_2")(input_ids[:, 1])
        return SDXLConditioning(context=jnp.concatenate([first, second], axis=-1), text_embeds=text_embeds,
                                time_ids=time_ids(self.image_size, input_ids.shape[0]))


def load_sdxl_text_encoders(folder: str, folder_2: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(SDXLTextEncoders, params) from an SDXL pipeline's ``text_encoder`` and ``text_encoder_2`` folders."""
    first, params = load_text_encoder(folder, dtype, param_dtype)
    second, params_2 = load_text_encoder(folder_2, dtype, param_dtype)
    if not isinstance(second, CLIPTextModelWithProjection):
        raise UnsupportedConfigError(f"{folder_2}/config.json: SDXL's text_encoder_2 must be a {WITH_PROJECTION} "
                                     "(its pooled text_embeds condition the UNet)")
    model = SDXLTextEncoders(first.config, second.config, dtype=dtype)
    return model, {"text_encoder": params, "text_encoder_2": params_2}
