"""Optimizers, their defaults, and gradient accumulation: the parts of a train step that know no diffusion."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and an optional warm-up / cosine schedule; the defaults are the
    paper's (docs/method.md §3) but for ``lr``, which differs between the student and the LoRA teacher."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0  # global-norm clipping; 0: none
    warmup_steps: int = 0
    decay_steps: int = 0  # >0: cosine decay to 0 over this many steps


def lr_schedule(lr: float, warmup_steps: int = 0, decay_steps: int = 0):
    """Constant by default (the paper); optional linear warm-up, optional cosine decay to 0."""
    if decay_steps:
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps)
    if warmup_steps:
        return optax.linear_schedule(0.0, lr, warmup_steps)
    return lambda step: jnp.asarray(lr, jnp.float32)


def scale_by_lr_at(schedule) -> optax.GradientTransformationExtraArgs:
    """Multiply updates by -schedule(step), ``step`` given to ``update`` by the caller: the train state's
    step, the one counter that the loop, the checkpoints and the EMA read too. (optax's own schedules
    count in the optimizer state, which a skipped update leaves behind.)"""

    def update(updates, state, params=None, *, step, **extra_args):
        del params, extra_args
        lr = schedule(step)
        return jax.tree_util.tree_map(lambda u: -lr * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(lr: float, b1=OptimizerConfig.b1, b2=OptimizerConfig.b2, eps=OptimizerConfig.eps,
                   weight_decay=OptimizerConfig.weight_decay, clip=OptimizerConfig.clip,
                   warmup_steps=OptimizerConfig.warmup_steps,
                   decay_steps=OptimizerConfig.decay_steps) -> optax.GradientTransformationExtraArgs:
    """``OptimizerConfig``'s chain: ``tx.update(grads, opt_state, params, step=step)``.

    Clipping and weight decay are identities when off, so the optimizer state has the same tree whatever
    the settings: a run can change its learning-rate schedule, clipping or weight decay on resume."""
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.scale_by_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        scale_by_lr_at(lr_schedule(lr, warmup_steps, decay_steps)),
    )


def keep_if(finite, new, old):
    """``new`` where ``finite`` holds, else ``old``, leaf by leaf: a non-finite update is dropped whole."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)


def accumulate_gradient(means_and_grads: Callable, params, batch, microbatches: int):
    """``means_and_grads(params, batch) -> (means, grads)`` of the whole batch, ``microbatches`` chunks at a time.

    ``means`` is a dict of batch means and ``grads`` has the tree of ``params``: the batch's values are then
    the means of the chunks', so the update is the whole batch's while activations exist for one chunk at a
    time. Every leaf of ``batch`` is split along its first axis; chunk j holds rows j, j+k, j+2k, ..., so
    each device's share of the batch splits in place and no row moves.
    """
    k = microbatches
    if k == 1:
        return means_and_grads(params, batch)
    chunked = lambda x: jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
    chunks = jax.tree_util.tree_map(chunked, batch)
    one_chunk = jax.tree_util.tree_map(lambda x: x[0], chunks)
    means_shape, _ = jax.eval_shape(means_and_grads, params, one_chunk)
    # The gradient sums start as zeros like the parameters, so they take the parameters' (FSDP) sharding.
    zeros = (jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), means_shape),
             jax.tree_util.tree_map(jnp.zeros_like, params))

    def add_chunk(total, chunk):
        return jax.tree_util.tree_map(jnp.add, total, means_and_grads(params, chunk)), None

    total, _ = jax.lax.scan(add_chunk, zeros, chunks)
    return jax.tree_util.tree_map(lambda x: x / k, total)
