"""Flax port of diffusers' ``UNet2DConditionModel`` as Stable Diffusion 1.x/2.x and SDXL use it (NHWC).

SDXL's extra conditioning is diffusers' ``addition_embed_type="text_time"``: the
micro-conditioning ``time_ids`` (original size, crop corner, target size) through the
sinusoidal ``add_time_proj``, concatenated after the pooled text embedding
``text_embeds``, through ``add_embedding`` and added to the timestep embedding.

Every submodule is named after its diffusers module path segment
(``down_blocks.1`` > ``attentions.0`` > ``transformer_blocks.0`` > ``attn2`` > ``to_q``),
so ``swiftbrush_jax.files.weights`` maps ``diffusion_pytorch_model.safetensors`` by rule.
"""

import dataclasses
import math
from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..files import weights
from ..parallel.sharding import shard_batch
from . import UnsupportedConfigError, read_config
from .layers import Attention, AttentionOptions, Downsample2D, LoRADense, ResnetBlock2D, Upsample2D, conv, group_norm

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"
REMAT_MODES = ("none", "full", "dots")

TEXT_TIME = "text_time"  # SDXL's addition_embed_type

# diffusers options that must keep the value SD 1.x/2.x/SDXL use: key -> (accepted values, who uses others).
_FIXED_OPTIONS = {
    "mid_block_type": ((MID_BLOCK,), ""),
    "addition_embed_type": ((None, TEXT_TIME), "Kandinsky / DeepFloyd IF"),
    "class_embed_type": ((None,), "class-conditioned UNets"),
    "num_class_embeds": ((None,), "class-conditioned UNets"),
    "class_embeddings_concat": ((False,), "class-conditioned UNets"),
    "encoder_hid_dim": ((None,), "DeepFloyd IF / Kandinsky"),
    "encoder_hid_dim_type": ((None,), "DeepFloyd IF / Kandinsky"),
    "time_cond_proj_dim": ((None,), "LCM"),
    "time_embedding_type": (("positional",), ""),
    "time_embedding_dim": ((None,), ""),
    "time_embedding_act_fn": ((None,), ""),
    "timestep_post_act": ((None,), ""),
    "resnet_time_scale_shift": (("default",), ""),
    "resnet_skip_time_act": ((False,), ""),
    "resnet_out_scale_factor": ((1.0,), ""),
    "act_fn": (("silu", "swish"), ""),
    "dual_cross_attention": ((False,), "Versatile Diffusion"),
    "mid_block_only_cross_attention": ((None, False), ""),
    "cross_attention_norm": ((None,), ""),
    "attention_type": (("default",), "GLIGEN"),
    "reverse_transformer_layers_per_block": ((None,), "SDXL refiners"),
    "conv_in_kernel": ((3,), ""),
    "conv_out_kernel": ((3,), ""),
    "downsample_padding": ((1,), ""),
}


def _unsupported(key: str, value, why: str = "") -> UnsupportedConfigError:
    note = f" ({why})" if why else ""
    return UnsupportedConfigError(
        f"unet/config.json: {key}={value!r} is not supported{note}; supported: SD 1.x/2.x and SDXL UNets"
    )


def _per_block(d: dict, key: str, default, n: int) -> Tuple:
    """An int-or-list option as one value per down block."""
    value = d.get(key, default)
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _unsupported(key, value, f"need one int or {n} ints, one per down block")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture of an SD 1.x/2.x or SDXL UNet, normalised to one value per down block.

    ``num_attention_heads`` is the true head count per block (diffusers' legacy
    ``attention_head_dim`` key already resolved); head size = channels / heads.
    Field defaults are SD 2.1-base's; ``from_diffusers`` fills absent keys with
    diffusers' own defaults instead, as diffusers would. ``addition_embed_type``
    is None (SD 1.x/2.x) or ``"text_time"`` (SDXL, with its two dims set).
    """

    down_block_types: Tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
    up_block_types: Tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: Tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: Tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    in_channels: int = 4
    out_channels: int = 4
    sample_size: Union[int, Tuple[int, int], None] = 64
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = True
    upcast_attention: bool = False
    mid_block_scale_factor: float = 1.0
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        """Parse a diffusers ``unet/config.json`` dict.

        Options this port lacks raise ``UnsupportedConfigError``; keys diffusers
        itself ignores (``_class_name``, ``dropout``, unknown names) are ignored.
        """
        for key, (accepted, why) in _FIXED_OPTIONS.items():
            if key in d and d[key] not in accepted:
                raise _unsupported(key, d[key], why)
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for key, types, allowed in (("down_block_types", down, (CROSS_ATTN_DOWN, PLAIN_DOWN)),
                                    ("up_block_types", up, (CROSS_ATTN_UP, PLAIN_UP))):
            for t in types:
                if t not in allowed:
                    raise _unsupported(key, t, f"block types: {', '.join(allowed)}")
        n = len(down)
        channels = d.get("block_out_channels", cls.block_out_channels)
        if len(up) != n or len(channels) != n:
            raise _unsupported("up_block_types", up, "need as many down/up block types as block_out_channels")
        only_cross = d.get("only_cross_attention", False)
        if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]):
            raise _unsupported("only_cross_attention", only_cross)
        if d.get("norm_num_groups", 32) is None:
            raise _unsupported("norm_num_groups", None)
        heads_key = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
        heads = _per_block(d, heads_key, 8, n)
        cross_dims = set(_per_block(d, "cross_attention_dim", 1280, n))
        if len(cross_dims) != 1:
            raise _unsupported("cross_attention_dim", d["cross_attention_dim"], "one text encoder width for all blocks")
        addition = d.get("addition_embed_type")
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            value = d.get(key)
            if addition is None and value is not None:
                raise _unsupported(key, value, "only with addition_embed_type='text_time' (SDXL)")
            if addition == TEXT_TIME and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise _unsupported(key, value, "addition_embed_type='text_time' needs a positive int")
        return cls(
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(channels),
            layers_per_block=_per_block(d, "layers_per_block", 2, n),
            transformer_layers_per_block=_per_block(d, "transformer_layers_per_block", 1, n),
            num_attention_heads=heads,
            cross_attention_dim=cross_dims.pop(),
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            sample_size=tuple(d["sample_size"]) if isinstance(d.get("sample_size"), list) else d.get("sample_size"),
            center_input_sample=d.get("center_input_sample", False),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=bool(d.get("upcast_attention") or False),  # SDXL's config.json has null
            mid_block_scale_factor=d.get("mid_block_scale_factor", 1.0),
            addition_embed_type=addition,
            addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
        )


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """A ``config.json`` dict diffusers' ``UNet2DConditionModel`` loads into the same architecture; SDXL's
    conditioning keys only for an SDXL UNet, so an SD 1.x/2.x config is written as diffusers writes it."""
    written = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": list(config.sample_size) if isinstance(config.sample_size, tuple) else config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "center_input_sample": config.center_input_sample,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        "down_block_types": list(config.down_block_types),
        "mid_block_type": MID_BLOCK,
        "up_block_types": list(config.up_block_types),
        "only_cross_attention": False,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": list(config.layers_per_block),
        "transformer_layers_per_block": list(config.transformer_layers_per_block),
        # diffusers reads the head count from this legacy key and refuses num_attention_heads.
        "attention_head_dim": list(config.num_attention_heads),
        "num_attention_heads": None,
        "cross_attention_dim": config.cross_attention_dim,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "use_linear_projection": config.use_linear_projection,
        "upcast_attention": config.upcast_attention,
        "mid_block_scale_factor": config.mid_block_scale_factor,
        "act_fn": "silu",
        "downsample_padding": 1,
        "resnet_time_scale_shift": "default",
    }
    if config.addition_embed_type is not None:
        written.update(addition_embed_type=config.addition_embed_type,
                       addition_time_embed_dim=config.addition_time_embed_dim,
                       projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim)
    return written


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' sinusoidal ``time_proj`` in float32: [sin | cos] (or [cos | sin]) over geometric frequencies."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class GEGLU(nn.Module):
    """Dense to twice the width, then value * exact-GELU(gate)."""

    features: int
    lora_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        projected = LoRADense(2 * self.features, True, self.lora_scale, self.dtype, name="proj")(x)
        value, gate = jnp.split(projected, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU at 4x width (``net.1`` is dropout, no params)."""

    lora_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(4 * x.shape[-1], self.lora_scale, self.dtype, name="net.0")(x)
        return LoRADense(x.shape[-1], True, self.lora_scale, self.dtype, name="net.2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, and GEGLU feed-forward, each residual."""

    heads: int
    dim_head: int
    upcast: bool = False
    lora_scale: float = 1.0
    attention: AttentionOptions = AttentionOptions()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast, lora_scale=self.lora_scale,
                                      options=self.attention, dtype=self.dtype, name=name)
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.lora_scale, self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, project the pixels to tokens, run the transformer blocks, project back, add the input."""

    heads: int
    depth: int
    groups: int
    linear_projection: bool
    upcast: bool = False
    lora_scale: float = 1.0
    attention: AttentionOptions = AttentionOptions()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        dim_head = c // self.heads
        inner = self.heads * dim_head
        y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        # SD 2.x projects with linear layers, SD 1.x with 1x1 convolutions: the same product, stored differently.
        project = lambda features, name: LoRADense(features, True, self.lora_scale, self.dtype,
                                                   pointwise_conv=not self.linear_projection, name=name)
        y = project(inner, "proj_in")(y.reshape(b, h * w, c))
        for i in range(self.depth):
            y = BasicTransformerBlock(self.heads, dim_head, self.upcast, self.lora_scale, self.attention,
                                      self.dtype, name=f"transformer_blocks.{i}")(y, context)
        y = project(c, "proj_out")(y).reshape(b, h, w, c)
        return shard_batch((y + x).astype(self.dtype))


def _rematted(cls, remat: str):
    """``cls`` itself, or wrapped so its activations are recomputed in the backward pass."""
    if remat == "none":
        return cls
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return nn.remat(cls, policy=policy)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Settings every resnet and transformer of one UNet shares; builds them inside a block's ``__call__``."""

    groups: int
    eps: float
    linear_projection: bool
    upcast: bool
    lora_scale: float
    remat: str
    attention: AttentionOptions
    dtype: jnp.dtype

    def resnet(self, out_channels: int, name: str, scale: float = 1.0):
        return _rematted(ResnetBlock2D, self.remat)(out_channels, self.groups, self.eps, scale, self.dtype,
                                                    self.lora_scale, name=name)

    def transformer(self, heads: int, depth: int, name: str):
        return _rematted(Transformer2DModel, self.remat)(
            heads, depth, self.groups, self.linear_projection, self.upcast, self.lora_scale, self.attention,
            self.dtype, name=name)


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D``; returns the output and its skips."""

    opts: BlockOptions
    out_channels: int
    num_layers: int
    cross_attention: bool
    heads: int
    depth: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = self.opts.resnet(self.out_channels, f"resnets.{i}")(x, temb)
            if self.cross_attention:
                x = self.opts.transformer(self.heads, self.depth, f"attentions.{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, dtype=self.opts.dtype, name="downsamplers.0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) once."""

    opts: BlockOptions
    heads: int
    depth: int
    scale: float

    @nn.compact
    def __call__(self, x, temb, context):
        channels = x.shape[-1]
        x = self.opts.resnet(channels, "resnets.0", self.scale)(x, temb)
        x = self.opts.transformer(self.heads, self.depth, "attentions.0")(x, context)
        return self.opts.resnet(channels, "resnets.1", self.scale)(x, temb)


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` or ``UpBlock2D``: resnet ``i`` first concatenates ``skips[-1 - i]`` on channels."""

    opts: BlockOptions
    out_channels: int
    num_layers: int
    cross_attention: bool
    heads: int
    depth: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x, skips, temb, context):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.opts.resnet(self.out_channels, f"resnets.{i}")(x, temb)
            if self.cross_attention:
                x = self.opts.transformer(self.heads, self.depth, f"attentions.{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.opts.dtype, name="upsamplers.0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    """The SD denoiser: (noisy latents NHWC, timesteps, text states) -> float32 prediction NHWC.

    An SDXL UNet (``addition_embed_type="text_time"``) also takes, by keyword, ``text_embeds``
    (B, D), the pooled projected embedding of ``text_encoder_2``, and ``time_ids`` (B, N), the
    micro-conditioning (SDXL: original height, width, crop top, left, target height, width);
    D + N * ``addition_time_embed_dim`` must be ``projection_class_embeddings_input_dim``.

    ``dtype`` is the compute dtype (params are cast to it in the layers);
    ``remat`` recomputes each resnet / transformer in the backward pass
    ("full") or all but its weight-matmul outputs ("dots"), trading compute for memory;
    ``lora_scale`` multiplies any adapter in the ``lora`` variable collection;
    ``attention_query_block`` > 0 runs attention that many queries at a time (memory, not math);
    ``attention_implementation`` picks its kernel (``layers.AttentionOptions``).
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    lora_scale: float = 1.0
    attention_query_block: int = 0
    attention_implementation: Optional[str] = None

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
        cfg = self.config
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_MODES}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"latent size {sample.shape[1:3]} must be a multiple of {factor} for this UNet")
        opts = BlockOptions(cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection, cfg.upcast_attention,
                            self.lora_scale, self.remat,
                            AttentionOptions(self.attention_query_block, self.attention_implementation or None),
                            self.dtype)
        batch = sample.shape[0]
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (batch,))
        base = cfg.block_out_channels[0]
        temb = timestep_embedding(t, base, cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = LoRADense(4 * base, True, self.lora_scale, self.dtype, name="time_embedding.linear_1")(temb)
        temb = LoRADense(4 * base, True, self.lora_scale, self.dtype, name="time_embedding.linear_2")(nn.silu(temb))
        if cfg.addition_embed_type == TEXT_TIME:
            temb = temb + self._text_time_embedding(text_embeds, time_ids, 4 * base)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds / time_ids were given to a UNet without addition_embed_type='text_time' "
                             "(they are SDXL's conditioning)")

        x = conv(base, 3, self.dtype, name="conv_in")(sample)
        skips = [x]
        last = len(cfg.block_out_channels) - 1
        for i, kind in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock(
                opts, cfg.block_out_channels[i], cfg.layers_per_block[i], kind == CROSS_ATTN_DOWN,
                cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i], i != last,
                name=f"down_blocks.{i}")(x, temb, context)
            skips.extend(block_skips)

        x = MidBlock(opts, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                     cfg.mid_block_scale_factor, name="mid_block")(x, temb, context)

        for i, kind in enumerate(cfg.up_block_types):
            j = last - i  # the mirrored down block
            num_layers = cfg.layers_per_block[j] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            x = UpBlock(
                opts, cfg.block_out_channels[j], num_layers, kind == CROSS_ATTN_UP,
                cfg.num_attention_heads[j], cfg.transformer_layers_per_block[j], i != last,
                name=f"up_blocks.{i}")(x, block_skips, temb, context)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, name="conv_out")(x).astype(jnp.float32)

    def _text_time_embedding(self, text_embeds, time_ids, features: int):
        """diffusers' ``add_embedding(concat(text_embeds, add_time_proj(time_ids.flatten()).reshape(B, -1)))``."""
        cfg = self.config
        if text_embeds is None or time_ids is None:
            missing = " and ".join(n for n, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None)
            raise ValueError(f"this UNet has addition_embed_type='text_time' (SDXL): pass {missing} "
                             "(text_embeds (B, D): text_encoder_2's pooled projection; time_ids (B, N): "
                             "original size, crop corner, target size)")
        text_embeds = jnp.asarray(text_embeds)
        time_ids = jnp.asarray(time_ids)
        if text_embeds.ndim != 2:
            raise ValueError(f"text_embeds must be (batch, width), got shape {text_embeds.shape}")
        batch = text_embeds.shape[0]
        time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                         cfg.freq_shift).reshape(batch, -1)
        width = text_embeds.shape[-1] + time_embeds.shape[-1]
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds width {text_embeds.shape[-1]} + {time_ids.size // batch} time ids x "
                f"addition_time_embed_dim {cfg.addition_time_embed_dim} = {width}, but this UNet's "
                f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
        h = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        h = LoRADense(features, True, self.lora_scale, self.dtype, name="add_embedding.linear_1")(h)
        return LoRADense(features, True, self.lora_scale, self.dtype, name="add_embedding.linear_2")(nn.silu(h))


def added_cond_shapes(config: UNetConfig, batch: int = 1) -> dict:
    """ShapeDtypeStructs of the keyword conditioning ``config``'s UNet takes ({} for SD 1.x/2.x).

    The split of ``projection_class_embeddings_input_dim`` between the text and the time ids is not
    in the config (SDXL: 1280 + 6 x 256; its refiner: 1280 + 5 x 256); SDXL's 6 ids are assumed, and
    when they do not fit, zero ids (the parameter shapes are the same either way).
    """
    if config.addition_embed_type != TEXT_TIME:
        return {}
    total, per_id = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
    ids = 6 if total > 6 * per_id else 0
    return {"text_embeds": jax.ShapeDtypeStruct((batch, total - ids * per_id), jnp.float32),
            "time_ids": jax.ShapeDtypeStruct((batch, ids), jnp.float32)}


def unet_param_shapes(config: UNetConfig, dtype=jnp.float32):
    """The params tree of ``config`` as ShapeDtypeStructs (nothing is allocated)."""
    model = UNet2DConditionModel(config, dtype)
    side = 2 ** (len(config.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, jnp.zeros((1,), jnp.int32), context,
                               **added_cond_shapes(config))
    return variables["params"]


def load_unet(folder: str, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none"):
    """(module, params) from a diffusers ``unet`` folder: ``config.json`` plus safetensors weights."""
    config = UNetConfig.from_diffusers(read_config(folder))
    model = UNet2DConditionModel(config, dtype, remat)
    state = weights.read_state_dict(folder)
    params = weights.state_dict_to_params(state, unet_param_shapes(config), what="unet", dtype=param_dtype)
    return model, params
