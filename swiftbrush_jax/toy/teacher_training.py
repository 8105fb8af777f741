"""The two training stages of the shapes teacher, as Stable Diffusion was trained: VAE, then latent UNet.

Stage 1 fits an AutoencoderKL to freshly rendered shapes images (L1
reconstruction plus a small KL term, sampled posterior, as in LDM without
the perceptual and GAN losses), then fine-tunes its decoder alone on
posterior means for sharper edges. Stage 2 encodes a fixed set of renders once
and trains the UNet and the CLIP text encoder jointly on the scaled latents
with the epsilon objective. Each time an image is drawn its caption names
both attributes or leaves colour, shape or both open (CAPTION_VARIANTS), so
the teacher learns "a circle" as the uniform mixture over colours; 10% of
the captions are replaced by "" so that classifier-free guidance works. Both stages use Adam with warm-up and cosine
decay and are deterministic functions of their seeds.
"""

import dataclasses
import time
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import schedule as sched
from . import shapes

EMPTY_PROMPT_PROB = 0.1
# How often a drawn image's caption is "a red circle", "a circle", "a red shape", "a shape" (before the ""
# replacement): the open captions together a little under half, as they are 10 of the 28 prompts.
CAPTION_VARIANTS = (0.55, 0.15, 0.15, 0.15)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Steps, batch and optimizer of one training stage."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int


def adam(stage: StageConfig) -> optax.GradientTransformation:
    warmup = min(stage.warmup_steps, stage.steps - 1)
    lr = optax.warmup_cosine_decay_schedule(0.0, stage.lr, warmup, stage.steps, stage.lr * 0.01)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def to_signed(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], the VAE's input range."""
    return images.astype(np.float32) / 127.5 - 1.0


def log_progress(name: str, step: int, total: int, loss: float, t0: float) -> None:
    print(f"[{name}] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)


def train_vae(vae, params, stage: StageConfig, kl_weight: float, image_px: int, log_every: int = 100):
    """Stage 1: returns the trained VAE params; each step renders a new batch (seed + step)."""
    tx = adam(stage)

    def loss_fn(p, x, key):
        mean, logvar = vae.apply({"params": p}, x, method=vae.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae.apply({"params": p}, z, method=vae.decode)
        kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
        return jnp.mean(jnp.abs(recon - x)) + kl_weight * kl

    @jax.jit
    def step_fn(p, opt, x, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, key)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    key = jax.random.PRNGKey(stage.seed)
    t0 = time.time()
    for step in range(stage.steps):
        images, _, _ = shapes.sample_dataset(stage.batch_size, stage.seed * 1_000_003 + step, image_px)
        params, opt, loss = step_fn(params, opt, jnp.asarray(to_signed(images)), jax.random.fold_in(key, step))
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            log_progress("vae", step + 1, stage.steps, float(loss), t0)
    return params


def finetune_decoder(vae, params, stage: StageConfig, image_px: int, log_every: int = 100):
    """Stage 1b: L1 fine-tuning of the decoder alone on posterior means (like SD's ft-MSE VAE decoders).

    The encoder, hence the latent space the UNet learns, is untouched, so this
    sharpens images without invalidating the latents.
    """
    tx = adam(stage)
    decoder_keys = ("decoder", "post_quant_conv")

    def loss_fn(decoder_params, frozen, x):
        p = {**frozen, **decoder_params}
        mean, _ = vae.apply({"params": p}, x, method=vae.encode)
        return jnp.mean(jnp.abs(vae.apply({"params": p}, jax.lax.stop_gradient(mean), method=vae.decode) - x))

    @jax.jit
    def step_fn(decoder_params, frozen, opt, x):
        loss, grads = jax.value_and_grad(loss_fn)(decoder_params, frozen, x)
        updates, opt = tx.update(grads, opt, decoder_params)
        return optax.apply_updates(decoder_params, updates), opt, loss

    decoder_params = {k: params[k] for k in decoder_keys}
    frozen = {k: v for k, v in params.items() if k not in decoder_keys}
    opt = tx.init(decoder_params)
    t0 = time.time()
    for step in range(stage.steps):
        images, _, _ = shapes.sample_dataset(stage.batch_size, stage.seed * 1_000_003 + step, image_px)
        decoder_params, opt, loss = step_fn(decoder_params, frozen, opt, jnp.asarray(to_signed(images)))
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            log_progress("decoder", step + 1, stage.steps, float(loss), t0)
    return {**frozen, **decoder_params}


def encode_dataset(vae, params, images: np.ndarray, chunk: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Posterior (mean, std) of the unscaled latents of uint8 images, in chunks."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    means, stds = [], []
    for start in range(0, len(images), chunk):
        mean, logvar = encode(params, jnp.asarray(to_signed(images[start:start + chunk])))
        means.append(np.asarray(mean))
        stds.append(np.asarray(jnp.exp(0.5 * logvar)))
    return np.concatenate(means), np.concatenate(stds)


def latent_scaling_factor(means: np.ndarray) -> float:
    """SD's scaling_factor: 1 / std of the latents, so the diffusion model sees unit variance."""
    return float(1.0 / means.std())


def caption_rows(attributes: Dict[str, np.ndarray], prompts) -> np.ndarray:
    """(n, 4) rows of `prompts` captioning image i in each CAPTION_VARIANTS way."""
    color, shape = attributes["color"], attributes["shape"]
    yes, no = np.ones(len(color), bool), np.zeros(len(color), bool)
    variants = [(yes, yes), (no, yes), (yes, no), (no, no)]
    return np.stack([[prompts.index(c) for c in shapes.captions_of(color, shape, keep_color, keep_shape)]
                     for keep_color, keep_shape in variants], axis=1)


def train_denoiser(unet, text_encoder, params: Dict, latents: Tuple[np.ndarray, np.ndarray],
                   rows: np.ndarray, token_ids: np.ndarray, schedule: sched.NoiseSchedule,
                   stage: StageConfig, ema_decay: float, log_every: int = 100,
                   on_snapshot: Optional[Callable[[int, Dict], None]] = None, snapshot_every: int = 0) -> Dict:
    """Stage 2: epsilon-prediction training of {"unet", "text"} params; returns their EMA.

    latents: (mean, std) of the scaled latents of the training images;
    rows[i] are the rows of token_ids holding image i's captions (caption_rows),
    one drawn per use with CAPTION_VARIANTS' odds; the last row of token_ids is
    the empty prompt, used with probability 0.1. Every snapshot_every steps the
    EMA so far is handed to on_snapshot(step, ema), to judge a long run early.
    """
    tx = adam(stage)
    means, stds = (jnp.asarray(a) for a in latents)
    ids = jnp.asarray(token_ids)
    rows = jnp.asarray(rows)
    variant_logits = jnp.log(jnp.asarray(CAPTION_VARIANTS))
    empty = len(token_ids) - 1
    n_train = schedule.num_train_timesteps

    def loss_fn(p, idx, key):
        k_z, k_t, k_eps, k_drop, k_variant = jax.random.split(key, 5)
        x0 = means[idx] + stds[idx] * jax.random.normal(k_z, means[idx].shape)
        t = jax.random.randint(k_t, (len(idx),), 0, n_train)
        eps = jax.random.normal(k_eps, x0.shape)
        variant = jax.random.categorical(k_variant, variant_logits, shape=(len(idx),))
        caption = rows[idx, variant]
        caption = jnp.where(jax.random.uniform(k_drop, (len(idx),)) < EMPTY_PROMPT_PROB, empty, caption)
        context = text_encoder.apply({"params": p["text"]}, ids[caption])
        out = unet.apply({"params": p["unet"]}, sched.add_noise(schedule, x0, eps, t), t, context)
        return jnp.mean((out - sched.target(schedule, x0, eps, t)) ** 2)

    @jax.jit
    def step_fn(p, ema, opt, key):
        k_idx, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_idx, (stage.batch_size,), 0, len(means))
        loss, grads = jax.value_and_grad(loss_fn)(p, idx, k_loss)
        updates, opt = tx.update(grads, opt, p)
        p = optax.apply_updates(p, updates)
        ema = jax.tree_util.tree_map(lambda e, q: ema_decay * e + (1.0 - ema_decay) * q, ema, p)
        return p, ema, opt, loss

    opt = tx.init(params)
    ema = params
    key = jax.random.PRNGKey(stage.seed)
    t0 = time.time()
    running = []
    for step in range(stage.steps):
        params, ema, opt, loss = step_fn(params, ema, opt, jax.random.fold_in(key, step))
        running.append(loss)
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            log_progress("unet", step + 1, stage.steps, float(jnp.mean(jnp.stack(running))), t0)
            running = []
        if on_snapshot and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < stage.steps:
            on_snapshot(step + 1, ema)
    return ema


def init_params(module, seed: int, *inputs) -> Dict:
    """A module's freshly initialised params for example inputs."""
    return jax.jit(module.init)(jax.random.PRNGKey(seed), *inputs)["params"]


def clip_targets(rows: jnp.ndarray, captions: jnp.ndarray) -> jnp.ndarray:
    """(B, B) soft targets of the contrastive loss: entry (i, j) is 1 / (number of captions in the batch that
    describe image i) where caption j describes image i (it is among rows[i]), else 0. "a circle" thus
    counts as a match for every circle in the batch, not as a negative."""
    match = jnp.any(rows[:, :, None] == captions[None, None, :], axis=1).astype(jnp.float32)
    return match / jnp.sum(match, axis=1, keepdims=True)


def train_clip(model, params: Dict, token_ids: np.ndarray, stage: StageConfig, image_px: int,
               log_every: int = 100) -> Dict:
    """Stage 3: the world's CLIP, trained contrastively (CLIP's symmetric cross-entropy with a learned
    temperature) on fresh renders captioned as stage 2 captions them (CAPTION_VARIANTS, no empty prompt).
    A caption that leaves an attribute open is a positive for every image it describes (clip_targets).
    params: {"model": CLIPModel params, "logit_scale": scalar}; returns them trained."""
    from ..models.clip import clip_pixels, cosine

    tx = adam(stage)
    ids = jnp.asarray(token_ids)
    variant_logits = jnp.log(jnp.asarray(CAPTION_VARIANTS))
    prompts = shapes.all_prompts()

    def loss_fn(p, pixels, rows, key):
        captions = rows[jnp.arange(len(rows)), jax.random.categorical(key, variant_logits, shape=(len(rows),))]
        image, text = model.apply({"params": p["model"]}, pixels, ids[captions])
        logits = jnp.exp(p["logit_scale"]) * cosine(image[:, None, :], text[None, :, :])
        targets = clip_targets(rows, captions)
        to_text = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
        described = (targets > 0).T  # text j's positives: the images it describes
        to_image = -jnp.sum(described / jnp.sum(described, 1, keepdims=True) * jax.nn.log_softmax(logits.T, 1), 1)
        return 0.5 * (jnp.mean(to_text) + jnp.mean(to_image))

    @jax.jit
    def step_fn(p, opt, pixels, rows, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, pixels, rows, key)
        updates, opt = tx.update(grads, opt, p)
        p = optax.apply_updates(p, updates)
        return {**p, "logit_scale": jnp.minimum(p["logit_scale"], jnp.log(100.0))}, opt, loss

    pixels_of = jax.jit(lambda images: clip_pixels(images, model.vision_config.image_size))
    opt = tx.init(params)
    key = jax.random.PRNGKey(stage.seed)
    t0 = time.time()
    for step in range(stage.steps):
        images, _, attributes = shapes.sample_dataset(stage.batch_size, stage.seed * 1_000_003 + step, image_px)
        rows = jnp.asarray(caption_rows(attributes, prompts))
        params, opt, loss = step_fn(params, opt, pixels_of(jnp.asarray(to_signed(images))), rows,
                                    jax.random.fold_in(key, step))
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            log_progress("clip", step + 1, stage.steps, float(loss), t0)
    return params
