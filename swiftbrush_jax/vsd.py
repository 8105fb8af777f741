"""The SwiftBrush train step: Variational Score Distillation into a one-step student (docs/method.md §3).

``VSD.losses_and_grads`` is the paper's step, top to bottom: the student maps
noise z to x0 at t = T-1; x0 is re-noised at t ~ U[t_min, t_max] and scored by
the frozen teacher and the LoRA teacher, both with classifier-free guidance;
w(t) (e_teacher - e_lora), w = sigma_t^2, is the gradient pushed into x0; the
LoRA teacher is trained with the teacher's denoising loss on stop_gradient(x0),
so it tracks the student's distribution. ``VSD.train_step`` wraps it: prompts
encoded, randomness drawn, gradients accumulated over microbatches, both trees
updated in the same compiled step. Everything after those two is their parts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from . import schedule as sched
from .generate import guided, one_step_x0
from .models.clip import clip_pixels, cosine
from .models.conditioning import apply_unet, as_float32, rows, where_dropped
from .optim import accumulate_gradient, keep_if
from .pair import guided_difference


@dataclasses.dataclass(frozen=True)
class VSD:
    """The static parts of the step: modules, schedule, optimizers, constants."""

    student_unet: nn.Module
    teacher_unet: nn.Module  # applied with and without the ``lora`` collection
    text_encoder: nn.Module
    schedule: Any
    config: VSDConfig
    student_tx: optax.GradientTransformation
    lora_tx: optax.GradientTransformation
    latent_shape: tuple  # (H, W, C) of the student's noise
    microbatches: int = 1  # the batch in this many sequential chunks, gradients summed: same update, less memory
    # The four score evaluations of the VSD gradient (teacher and LoRA teacher, both guided) run in this module
    # (the teacher at another compute dtype; None: teacher_unet) with float32 matmuls at this precision
    # (None: the backend's default; what each backend makes of it: swiftbrush_jax.precision). Their difference
    # is small next to each score, so bf16 rounding of the two would drown it early in a run, while the LoRA
    # teacher is still close to the teacher (docs/bf16.md).
    score_unet: Optional[nn.Module] = None
    score_precision: Optional[str] = None
    # The difference e_lora - e_teacher from one pair pass of the adapted UNet (swiftbrush_jax.pair) instead of
    # subtracting two guided scores: exact to the pass's dtype relative to the difference itself.
    score_pair: bool = False
    # The student's trainable tree: a whole UNet, or (lora_student) a LoRA collection laid over the frozen
    # teacher's weights, applied by ``student_unet`` with the student's LoRA scale: no third copy of the UNet
    # (SwiftBrush v2's student B, docs/method.md §6).
    lora_student: bool = False
    # With the CLIP loss: the CLIP model (models.clip.CLIPModel) and decode(params, x0) -> images in [-1, 1], a
    # decoder of the latents the UNet sees (TAESD, or the teacher's VAE).
    clip_model: Optional[nn.Module] = None
    clip_decode: Optional[Callable] = None

    def train_step(self, state: TrainState, frozen: Frozen, token_ids):
        """One full SwiftBrush update from a batch of prompt token ids."""
        rng, step_rng = jax.random.split(state.rng)
        cond = self.text_encoder.apply({"params": frozen.text}, token_ids)
        batch = Batch(cond=cond, noise=self.draw(step_rng, token_ids.shape[0]), token_ids=token_ids)
        params = Trainable(student=state.student, lora=state.lora)
        metrics, grads = self.gradients(params, frozen, batch, self.clip_weight_at(state.step))
        new_state, metrics = self.apply_updates(state, grads, metrics, rng)
        if self.config.lora_updates_per_step > 1 and self.config.use_lora_teacher:  # SDS reads no LoRA teacher
            extra_rng = jax.random.fold_in(step_rng, 1)
            new_state, metrics["loss_lora_extra"] = self.extra_lora_updates(new_state, frozen, cond, extra_rng,
                                                                            state.step)
        return new_state, metrics

    def losses_and_grads(self, params: Trainable, frozen: Frozen, batch: Batch, clip_weight=0.0):
        """The paper's step on one batch: (batch means of the losses and of x0 and x0^2, gradients of both
        trees, each from its own loss only)."""
        cond, noise = as_float32(batch.cond), batch.noise
        # 1. The one-step student: x0 from noise z at t = T - 1.
        x0, pullback = jax.vjp(lambda p: self.student_x0(p, frozen.teacher, noise.z, cond), params.student)
        # 2. The VSD gradient at x0, w(t) (e_teacher - e_lora), pulled back through the student: it is the
        #    x0-gradient of loss_student = 0.5 mean((x0 - sg(x0 - grad))^2), grad / x0.size.
        grad = jax.lax.stop_gradient(self.vsd_gradient(frozen.teacher, params.lora, x0, cond, frozen.uncond, noise))
        x0_cotangent = grad / grad.size
        means = {"loss_student": 0.5 * jnp.mean(grad**2), "x0_mean": jnp.mean(x0), "x0_sq_mean": jnp.mean(x0**2)}
        if self.config.clip_weight:  # SwiftBrush v2's CLIP loss adds its own x0-gradient
            (means["loss_clip"], cos), clip_grad = jax.value_and_grad(self.clip_loss, has_aux=True)(
                x0, frozen.clip, batch.token_ids, clip_weight)
            means["clip_cosine"] = jnp.mean(cos)
            x0_cotangent = x0_cotangent + clip_grad
        (student_grads,) = pullback(x0_cotangent)
        # 3. The LoRA teacher's denoising loss on the student's samples.
        means["loss_lora"], lora_grads = jax.value_and_grad(self.lora_loss)(
            params.lora, frozen.teacher, jax.lax.stop_gradient(x0), cond, frozen.uncond, noise)
        return means, Trainable(student=student_grads, lora=lora_grads)

    def gradients(self, params: Trainable, frozen: Frozen, batch: Batch, clip_weight=0.0):
        """``losses_and_grads`` of the whole batch in ``microbatches`` chunks, x0's spread as its std."""
        step = functools.partial(self.losses_and_grads, frozen=frozen, clip_weight=clip_weight)
        means, grads = accumulate_gradient(lambda p, b: step(p, batch=b), params, batch, self.microbatches)
        return with_x0_std(means), grads

    def vsd_gradient(self, teacher_params, lora_params, x0, cond, uncond, noise: Noise):
        """w(t) (e_teacher - e_lora) at x_t = a_t x0 + s_t eps, non-finite entries zeroed."""
        c, t = self.config, noise.t_vsd
        unet = self.score_unet or self.teacher_unet
        x_t = sched.add_noise(self.schedule, x0, noise.eps_vsd, t)
        _, sigma = sched.alpha_sigma(self.schedule, t)
        if self.score_pair and c.use_lora_teacher:
            _, difference = guided_difference(unet, teacher_params, lora_params, x_t, t, cond, uncond,
                                              c.guidance_scale, c.lora_guidance_scale)
            # The epsilon a prediction implies is affine in it at fixed x_t: differences convert without x_t.
            difference = sched.to_epsilon(self.schedule, difference, jnp.zeros_like(x_t), t)
            return jnp.nan_to_num(-sigma**2 * difference, nan=0.0, posinf=0.0, neginf=0.0)
        with jax.default_matmul_precision(self.score_precision):
            e_teacher = guided(unet, {"params": teacher_params}, x_t, t, cond, uncond, c.guidance_scale)
            e_teacher = sched.to_epsilon(self.schedule, e_teacher, x_t, t)
            if c.use_lora_teacher:
                e_lora = guided(unet, {"params": teacher_params, "lora": lora_params},
                                x_t, t, cond, uncond, c.lora_guidance_scale)
                e_lora = sched.to_epsilon(self.schedule, e_lora, x_t, t)
            else:  # the paper's SDS ablation
                e_lora = noise.eps_vsd
        grad = sigma**2 * (e_teacher - e_lora)
        return jnp.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def lora_loss(self, lora_params, teacher_params, x0, cond, uncond, noise: Noise):
        """The teacher's own denoising loss on the student's samples, weighted by abar_t."""
        t = noise.t_lora
        x_t = sched.add_noise(self.schedule, x0, noise.eps_lora, t)
        out = apply_unet(self.teacher_unet, {"params": teacher_params, "lora": lora_params}, x_t, t,
                         where_dropped(noise.drop, uncond, cond))
        err = out.astype(jnp.float32) - sched.target(self.schedule, x0, noise.eps_lora, t)
        abar = jnp.asarray(self.schedule.alphas_cumprod)[t][:, None, None, None]
        return jnp.mean(abar * err**2)

    @property
    def student_t(self) -> int:
        return self.config.student_t if self.config.student_t >= 0 else self.schedule.num_train_timesteps - 1

    def student_x0(self, student_params, teacher_params, z, cond):
        """The one-step generator at t = T-1 (docs/method.md §3, step 1)."""
        return one_step_x0(self.student_unet, self.student_variables(student_params, teacher_params), z, cond,
                           self.schedule, self.student_t, output_is_x0=not self.config.student_x0_parameterization)

    def student_variables(self, student_params, teacher_params) -> dict:
        """The student UNet's flax variables: its own weights, or the teacher's with the student's LoRA."""
        if self.lora_student:
            return {"params": teacher_params, "lora": student_params}
        return {"params": student_params}

    def draw(self, rng, batch: int) -> Noise:
        c = self.config
        k = jax.random.split(rng, 6)
        shape = (batch,) + tuple(self.latent_shape)
        return Noise(
            z=jax.random.normal(k[0], shape),
            t_vsd=jax.random.randint(k[1], (batch,), c.t_min, c.t_max + 1),
            eps_vsd=jax.random.normal(k[2], shape),
            t_lora=jax.random.randint(k[3], (batch,), c.lora_t_min, c.lora_t_max + 1),
            eps_lora=jax.random.normal(k[4], shape),
            drop=jax.random.bernoulli(k[5], c.uncond_prob, (batch,)),
        )

    def clip_weight_at(self, step):
        """w(k) of the CLIP loss at the state's step: clip_weight falling linearly to 0 over clip_anneal_steps."""
        c = self.config
        if c.clip_anneal_steps <= 0:
            return jnp.float32(c.clip_weight)
        return c.clip_weight * jnp.maximum(0.0, 1.0 - step.astype(jnp.float32) / c.clip_anneal_steps)

    def clip_loss(self, x0, clip, token_ids, weight):
        """(w mean(max(0, tau - cos)), cos) of the decoded x0 against its prompts; differentiable in x0.
        ``clip``: the frozen {"model": CLIP weights, "decoder": decoder weights}."""
        images = self.clip_decode(clip["decoder"], x0)
        pixels = clip_pixels(images, self.clip_model.vision_config.image_size)
        variables = {"params": clip["model"]}
        image_features = self.clip_model.apply(variables, pixels, method="image_features")
        text_features = jax.lax.stop_gradient(self.clip_model.apply(variables, token_ids, method="text_features"))
        cos = cosine(image_features, text_features)
        return weight * jnp.mean(jax.nn.relu(self.config.clip_tau - cos)), cos

    def apply_updates(self, state: TrainState, grads: Trainable, metrics, rng) -> tuple:
        """Both optax chains and the EMA; the whole update is dropped if anything is non-finite."""
        s_updates, student_opt = self.student_tx.update(grads.student, state.student_opt, state.student,
                                                        step=state.step)
        student = optax.apply_updates(state.student, s_updates)
        l_updates, lora_opt = self.lora_tx.update(grads.lora, state.lora_opt, state.lora, step=state.step)
        lora = optax.apply_updates(state.lora, l_updates)
        norms = {"grad_norm_student": optax.global_norm(grads.student), "grad_norm_lora": optax.global_norm(grads.lora)}
        finite = jnp.all(jnp.isfinite(jnp.stack([metrics["loss_student"], metrics["loss_lora"],
                                                 norms["grad_norm_student"], norms["grad_norm_lora"]])))
        # The EMA reads the updated student from its output buffer. Without the barrier XLA recomputes the
        # update inside the EMA's fusion from the old weights, which then must outlive the in-place write of
        # the new ones: it keeps a copy of every student weight alive for the whole step.
        student = jax.lax.optimization_barrier(keep_if(finite, student, state.student))
        k = state.step.astype(jnp.float32)
        decay = jnp.minimum(self.config.ema_decay, (1.0 + k) / (10.0 + k))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, student)
        new_state = state.replace(
            step=state.step + 1, rng=rng,
            student=student, ema=keep_if(finite, ema, state.ema), lora=keep_if(finite, lora, state.lora),
            student_opt=keep_if(finite, student_opt, state.student_opt),
            lora_opt=keep_if(finite, lora_opt, state.lora_opt),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            skip_streak=jnp.where(finite, 0, state.skip_streak + 1),
        )
        return new_state, {**metrics, **norms, "finite": finite, "ema_decay": decay,
                           "skip_streak": new_state.skip_streak}

    def extra_lora_updates(self, state: TrainState, frozen: Frozen, cond, rng, step) -> tuple:
        """The LoRA teacher's further ``lora_updates_per_step - 1`` updates (two time-scale updates), each on
        fresh student samples (the updated student, the same prompts) with fresh noise, in ``microbatches``.

        An update whose loss or gradient is not finite is dropped (counted in ``skipped``, not in the
        streak: the student's update decides that). ``step`` sets the learning rate, as for the step's
        first update. Returns (state, mean LoRA loss of these updates)."""

        def loss_and_grad(lora, batch: Batch):
            x0 = jax.lax.stop_gradient(self.student_x0(state.student, frozen.teacher, batch.noise.z, batch.cond))
            loss, grads = jax.value_and_grad(self.lora_loss)(lora, frozen.teacher, x0, batch.cond, frozen.uncond,
                                                             batch.noise)
            return {"loss_lora": loss}, grads

        def one_update(carry, key):
            lora, lora_opt, skipped = carry
            batch = Batch(cond=as_float32(cond), noise=self.draw(key, rows(cond)))
            means, grads = accumulate_gradient(loss_and_grad, lora, batch, self.microbatches)
            updates, new_opt = self.lora_tx.update(grads, lora_opt, lora, step=step)
            finite = jnp.isfinite(means["loss_lora"]) & jnp.isfinite(optax.global_norm(grads))
            carry = (keep_if(finite, optax.apply_updates(lora, updates), lora), keep_if(finite, new_opt, lora_opt),
                     skipped + (~finite).astype(jnp.int32))
            return carry, means["loss_lora"]

        keys = jax.random.split(rng, self.config.lora_updates_per_step - 1)
        (lora, lora_opt, skipped), losses = jax.lax.scan(one_update, (state.lora, state.lora_opt, state.skipped),
                                                         keys)
        return state.replace(lora=lora, lora_opt=lora_opt, skipped=skipped), jnp.mean(losses)

    def init_state(self, rng, student_params, lora_params) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero, student=student_params, ema=jax.tree_util.tree_map(jnp.copy, student_params),
            lora=lora_params, student_opt=self.student_tx.init(student_params),
            lora_opt=self.lora_tx.init(lora_params), rng=rng, skipped=zero, skip_streak=zero)

    def jit_train_step(self, state_shardings, frozen_shardings, batch_sharding, replicated) -> Callable:
        """The step compiled once with explicit shardings; the state's buffers are donated.

        It is traced under the mesh of ``batch_sharding``, so the models keep their
        activations split over the batch (``sharding.shard_batch``)."""
        mesh = batch_sharding.mesh.abstract_mesh

        def train_step(state, frozen, token_ids):
            with jax.sharding.use_abstract_mesh(mesh):
                return self.train_step(state, frozen, token_ids)

        return jax.jit(
            train_step,
            in_shardings=(state_shardings, frozen_shardings, batch_sharding),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        )


@dataclasses.dataclass(frozen=True)
class VSDConfig:
    """The method's constants; the defaults are the paper's (docs/method.md §3), and configs/ start from them."""

    guidance_scale: float = 4.5  # CFG of the frozen teacher
    lora_guidance_scale: float = 4.5  # CFG of the LoRA teacher (official code: same as the teacher's)
    t_min: int = 20
    t_max: int = 980
    lora_t_min: int = 0
    lora_t_max: int = 999
    uncond_prob: float = 0.1  # prompt dropout for the LoRA teacher's loss
    student_t: int = -1  # -1: the schedule's last step, T - 1
    ema_decay: float = 0.9999
    # Ablations of the paper: plain SDS (the LoRA teacher's score replaced by the injected noise),
    # and a student whose output is taken as x0 directly instead of x0 = (z - s_T e) / a_T.
    use_lora_teacher: bool = True
    student_x0_parameterization: bool = True
    # Two time-scale updates (DMD2's TTUR): the LoRA teacher takes this many Adam steps per student step.
    # The first uses the step's own samples; each further one draws fresh student samples (the updated
    # student, the same prompts) with fresh noise, timesteps and prompt dropout. The SDS ablation, which
    # reads no LoRA teacher, skips the further ones.
    lora_updates_per_step: int = 1
    # SwiftBrush v2's clamped CLIP loss (docs/method.md §6), added to the student's: w(k) mean(max(0, tau -
    # cos(E_img(D(x0)), E_txt(prompt)))), w(k) falling linearly from clip_weight to 0 over clip_anneal_steps
    # (0: constant). 0 turns it off.
    clip_weight: float = 0.0
    clip_tau: float = 0.35
    clip_anneal_steps: int = 0


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; the frozen teacher and text encoder are not here."""

    step: jax.Array
    student: Any
    ema: Any
    lora: Any
    student_opt: Any
    lora_opt: Any
    rng: jax.Array
    skipped: jax.Array  # updates skipped for a non-finite loss or gradient, in total
    skip_streak: jax.Array  # ... in a row, up to now


class Frozen(struct.PyTreeNode):
    """Frozen inputs of every step: teacher UNet and text encoder weights, the empty-prompt embedding."""

    teacher: Any
    text: Any
    uncond: Any  # the empty prompt's conditioning, one row (models.conditioning)
    clip: Any = None  # with the CLIP loss: {"model": CLIP weights, "decoder": the decoder's weights}


class Trainable(struct.PyTreeNode):
    """The two trained trees, or their gradients: the student (a UNet, or its LoRA) and the LoRA teacher."""

    student: Any
    lora: Any


class Noise(struct.PyTreeNode):
    """All randomness of one step, drawn up front so the step can be checked against a reference."""

    z: jax.Array  # student input noise, NHWC
    t_vsd: jax.Array  # (B,) int
    eps_vsd: jax.Array
    t_lora: jax.Array
    eps_lora: jax.Array
    drop: jax.Array  # (B,) bool: use the empty prompt for the LoRA loss


class Batch(struct.PyTreeNode):
    """One step's per-example inputs: what microbatching splits along its first axis."""

    cond: Any  # the prompts' conditioning: (B, T, D) embeddings, or SDXL's (models.conditioning)
    noise: Noise
    token_ids: Optional[jax.Array] = None  # (B, T): the CLIP loss's prompts


def with_x0_std(means: dict) -> dict:
    """Batch metrics with x0's mean and mean square turned into its standard deviation."""
    means = dict(means)
    mean, sq_mean = means.pop("x0_mean"), means.pop("x0_sq_mean")
    return {**means, "x0_std": jnp.sqrt(jnp.maximum(sq_mean - mean**2, 0.0))}
