"""The step's gradients and update called with loose arrays, as the tests compare them against references."""

import functools

import jax

from swiftbrush_jax.vsd import Batch, Frozen, Trainable


def gradients(vsd, student, lora, teacher, cond, uncond, noise, clip=None):
    """(metrics, student gradient, LoRA gradient) of ``vsd.gradients``; ``clip``: (CLIP and decoder weights,
    prompt token ids, weight) for the CLIP loss."""
    frozen = Frozen(teacher=teacher, text=None, uncond=uncond, clip=None if clip is None else clip[0])
    batch = Batch(cond=cond, noise=noise, token_ids=None if clip is None else clip[1])
    metrics, grads = vsd.gradients(Trainable(student=student, lora=lora), frozen, batch,
                                   0.0 if clip is None else clip[2])
    return metrics, grads.student, grads.lora


def jit_gradients(vsd):
    return jax.jit(functools.partial(gradients, vsd))


def jit_update(vsd):
    """``vsd.apply_updates`` taking (state, student gradient, LoRA gradient, metrics, rng)."""
    return jax.jit(lambda state, student_grads, lora_grads, metrics, rng: vsd.apply_updates(
        state, Trainable(student=student_grads, lora=lora_grads), metrics, rng))
