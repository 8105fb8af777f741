"""Building blocks shared by the UNet and the VAE (NHWC, diffusers param names)."""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..parallel.sharding import shard_batch

Dtype = jnp.dtype


def group_norm(groups: int, eps: float, dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
    """torch.nn.GroupNorm equivalent; Flax computes the statistics in float32."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, stride: int = 1, padding=None, name: Optional[str] = None) -> nn.Conv:
    """A 2D convolution with torch's symmetric 'same' padding by default."""
    pad = ((kernel // 2, kernel // 2),) * 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


class LoRADense(nn.Module):
    """A Dense layer that adds a low-rank update when the ``lora`` collection holds one.

    The frozen weights live in ``params`` (``kernel``/``bias``); adapters live in
    the separate ``lora`` collection (``down`` [in, r], ``up`` [r, out]) so the
    LoRA teacher reuses the teacher's parameter tree instead of copying it.
    ``pointwise_conv`` keeps the kernel as a 1x1 convolution's [1, 1, in, out]
    (diffusers' ``conv_shortcut``, SD 1.x's ``proj_in``/``proj_out``), which is
    this same product over the channels.
    """

    features: int
    use_bias: bool = True
    lora_scale: float = 1.0
    dtype: Dtype = jnp.float32
    pointwise_conv: bool = False

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1) + shape if self.pointwise_conv else shape)
        y = jnp.dot(x.astype(self.dtype), kernel.reshape(shape).astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        if self.has_variable("lora", "down"):
            down = self.get_variable("lora", "down").astype(self.dtype)
            up = self.get_variable("lora", "up").astype(self.dtype)
            y = y + self.lora_scale * jnp.dot(jnp.dot(x.astype(self.dtype), down), up)
        return y


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How every attention of a UNet computes (memory and kernels, not math).

    ``query_block`` > 0: that many queries at a time. One fused call holds batch x heads x queries x keys
    float32 scores: 5.4 GB for one SD 2.1 self-attention at 512 px and batch 16. In blocks of queries, each
    recomputed in the backward pass, it holds one block's scores instead; the result is the same up to float
    rounding. ``implementation``: ``jax.nn.dot_product_attention``'s, None to let XLA choose, "cudnn" for
    cuDNN's fused kernel (NVIDIA GPUs, bf16/fp16 only), "xla" for XLA's own."""

    query_block: int = 0
    implementation: Optional[str] = None


def attention(q, k, v, options: AttentionOptions = AttentionOptions()):
    """Softmax attention over [batch, tokens, heads, dim], computed as ``options`` say."""
    n, query_block = q.shape[1], options.query_block
    fused = lambda queries: jax.nn.dot_product_attention(queries, k, v, implementation=options.implementation)
    if not query_block or n <= query_block:
        return fused(q)
    pad = -n % query_block
    blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = blocks.reshape(q.shape[0], -1, query_block, *q.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(fused), blocks)
    return out.swapaxes(0, 1).reshape(q.shape[0], n + pad, *q.shape[2:])[:, :n]


class Attention(nn.Module):
    """diffusers' ``Attention``: to_q/to_k/to_v, fused dot-product attention, to_out.0.

    Uses ``jax.nn.dot_product_attention`` so XLA may pick a fused kernel on GPU.
    ``upcast`` runs the scores and softmax in float32 (SD 2.x 768-v checkpoints);
    ``options`` bound the scores' memory and pick the kernel (``AttentionOptions``).
    """

    heads: int
    dim_head: int
    out_dim: Optional[int] = None
    qkv_bias: bool = False
    upcast: bool = False
    lora_scale: float = 1.0
    options: AttentionOptions = AttentionOptions()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        proj = lambda name: LoRADense(inner, self.qkv_bias, self.lora_scale, self.dtype, name=name)
        q, k, v = proj("to_q")(x), proj("to_k")(context), proj("to_v")(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        q, k, v = shard_batch(split(q)), shard_batch(split(k)), shard_batch(split(v))
        if self.upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        out = shard_batch(attention(q, k, v, self.options).astype(self.dtype))
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return LoRADense(self.out_dim or x.shape[-1], True, self.lora_scale, self.dtype, name="to_out.0")(out)


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (default time-embedding norm, SiLU, optional 1x1 shortcut); the time
    projection and the shortcut take LoRA adapters like the attention's projections."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, name="conv1")(h)
        if temb is not None:
            t = LoRADense(self.out_channels, True, self.lora_scale, self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = LoRADense(self.out_channels, True, self.lora_scale, self.dtype, pointwise_conv=True,
                          name="conv_shortcut")(x)
        return shard_batch(((x + h) / self.output_scale_factor).astype(self.dtype))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``asymmetric`` pads (0, 1) like the VAE encoder."""

    out_channels: int
    asymmetric: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        padding = ((0, 1), (0, 1)) if self.asymmetric else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, self.dtype, stride=2, padding=padding, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, self.dtype, name="conv")(x)
