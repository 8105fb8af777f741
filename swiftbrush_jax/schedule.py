"""Diffusion noise schedules and the DDIM sampler, matched number for number to diffusers.

A ``NoiseSchedule`` is built from a diffusers ``scheduler_config.json`` and
holds abar_t (``alphas_cumprod``) exactly as diffusers computes it in float32,
so a student trained here and exported to diffusers sees the same a_t, s_t.

Conventions: latents are NHWC; timesteps are integer arrays, scalar or of
shape (B,); a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t), x_t = a_t x0 + s_t eps.
All helpers are pure jax.numpy functions; the schedule is a pytree whose
config fields are static, so it can be closed over or passed to ``jax.jit``.
"""

import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from swiftbrush_jax.models import UnsupportedConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Values diffusers' DDIMScheduler uses when a key is missing from the config,
# so a schedule read here equals ``DDIMScheduler.from_config`` of the same dict.
DDIM_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    clip_sample=True,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0,
    sample_max_value=1.0,
    timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def _torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(..., dtype=float32)`` on CPU: the first half counts up from
    ``start``, the second half down from ``end``, each as one fused multiply-add."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(num - 1)))
    index = np.arange(num)
    from_start = np.float64(start32) + step * index
    from_end = np.float64(end32) - step * (num - 1 - index)
    return np.where(index < num // 2, from_start, from_end).astype(np.float32)


def _cumprod_float32(values: np.ndarray) -> np.ndarray:
    """torch's CPU cumprod of a float32 tensor: accumulated in float64, stored as float32."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _glide_cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The ``squaredcos_cap_v2`` betas (improved-DDPM cosine abar), in float64 then float32."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift and scale sqrt(abar) so the last step has zero SNR,
    keeping the first step's value; float32 throughout, as diffusers does."""
    sqrt_abar = np.sqrt(_cumprod_float32(np.float32(1.0) - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar * sqrt_abar
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return np.float32(1.0) - alphas


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    if beta_schedule == "linear":
        return _torch_linspace_float32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        root = _torch_linspace_float32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return _glide_cosine_betas(num_train_timesteps)
    raise UnsupportedConfigError(f"beta_schedule={beta_schedule!r}; supported: {BETA_SCHEDULES}")


def _require_choice(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise UnsupportedConfigError(f"{key}={value!r}; supported: {choices}")


@struct.dataclass
class NoiseSchedule:
    """abar_t of a discrete diffusion process plus the config options that change its use.

    ``alphas_cumprod`` is the only array (float32, length ``num_train_timesteps``);
    the rest are static pytree fields, kept so the schedule can be written back
    out as a diffusers DDIMScheduler config.
    """

    alphas_cumprod: np.ndarray
    num_train_timesteps: int = struct.field(pytree_node=False)
    beta_start: float = struct.field(pytree_node=False)
    beta_end: float = struct.field(pytree_node=False)
    beta_schedule: str = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)
    timestep_spacing: str = struct.field(pytree_node=False)
    steps_offset: int = struct.field(pytree_node=False)
    set_alpha_to_one: bool = struct.field(pytree_node=False)
    clip_sample: bool = struct.field(pytree_node=False)
    clip_sample_range: float = struct.field(pytree_node=False)
    rescale_betas_zero_snr: bool = struct.field(pytree_node=False)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict (DDPM, DDIM, PNDM or Euler).

        Missing keys take DDIMScheduler's defaults; keys that only steer another
        sampler (``skip_prk_steps``, ``use_karras_sigmas``, ...) are ignored.
        Options this port does not implement raise ``UnsupportedConfigError``.
        """
        c = {**DDIM_DEFAULTS, **config}
        if c["thresholding"]:
            raise UnsupportedConfigError("thresholding=True (dynamic thresholding) is not implemented")
        if c["trained_betas"] is not None:
            raise UnsupportedConfigError("trained_betas is not implemented; use a named beta_schedule")
        _require_choice("beta_schedule", c["beta_schedule"], BETA_SCHEDULES)
        _require_choice("prediction_type", c["prediction_type"], PREDICTION_TYPES)
        _require_choice("timestep_spacing", c["timestep_spacing"], TIMESTEP_SPACINGS)

        num_train_timesteps = int(c["num_train_timesteps"])
        betas = _betas(num_train_timesteps, c["beta_start"], c["beta_end"], c["beta_schedule"])
        if c["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)
        return cls(
            alphas_cumprod=_cumprod_float32(np.float32(1.0) - betas),
            num_train_timesteps=num_train_timesteps,
            beta_start=float(c["beta_start"]),
            beta_end=float(c["beta_end"]),
            beta_schedule=c["beta_schedule"],
            prediction_type=c["prediction_type"],
            timestep_spacing=c["timestep_spacing"],
            steps_offset=int(c["steps_offset"]),
            set_alpha_to_one=bool(c["set_alpha_to_one"]),
            clip_sample=bool(c["clip_sample"]),
            clip_sample_range=float(c["clip_sample_range"]),
            rescale_betas_zero_snr=bool(c["rescale_betas_zero_snr"]),
        )

    @classmethod
    def from_folder(cls, pipeline_dir: str) -> "NoiseSchedule":
        """Read ``<pipeline_dir>/scheduler/scheduler_config.json`` of a diffusers pipeline."""
        with open(os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")) as f:
            return cls.from_config(json.load(f))

    def to_ddim_config(self, **overrides) -> dict:
        """A diffusers DDIMScheduler config with this schedule, ``overrides`` applied on top.

        Raises ``TypeError`` for an override that is not a DDIMScheduler option.
        """
        unknown = sorted(set(overrides) - set(DDIM_DEFAULTS))
        if unknown:
            raise TypeError(f"not DDIMScheduler options: {unknown}")
        config = {
            "_class_name": "DDIMScheduler",
            **DDIM_DEFAULTS,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }
        config.update(overrides)
        return config


def _per_sample(values: jax.Array) -> jax.Array:
    """Append three unit axes so per-timestep scalars broadcast over NHWC latents."""
    return values.reshape(values.shape + (1, 1, 1))


def alpha_sigma(schedule: NoiseSchedule, t) -> tuple:
    """(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)), shaped (B, 1, 1, 1) for t of shape (B,)."""
    abar = _per_sample(jnp.asarray(schedule.alphas_cumprod)[t])
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, eps: jax.Array, t) -> jax.Array:
    """The forward process: x_t = a_t x0 + s_t eps."""
    a, s = alpha_sigma(schedule, t)
    return a * x0 + s * eps


def to_epsilon(schedule: NoiseSchedule, output: jax.Array, x_t: jax.Array, t) -> jax.Array:
    """The noise eps implied by a model output of the schedule's prediction type."""
    a, s = alpha_sigma(schedule, t)
    if schedule.prediction_type == "epsilon":
        return output
    if schedule.prediction_type == "v_prediction":
        return a * output + s * x_t
    return (x_t - a * output) / s


def to_x0(schedule: NoiseSchedule, output: jax.Array, x_t: jax.Array, t) -> jax.Array:
    """The clean sample x0 implied by a model output of the schedule's prediction type."""
    a, s = alpha_sigma(schedule, t)
    if schedule.prediction_type == "epsilon":
        return (x_t - s * output) / a
    if schedule.prediction_type == "v_prediction":
        return a * x_t - s * output
    return output


def target(schedule: NoiseSchedule, x0: jax.Array, eps: jax.Array, t) -> jax.Array:
    """What a model of the schedule's prediction type is trained to output at x_t."""
    if schedule.prediction_type == "epsilon":
        return eps
    if schedule.prediction_type == "v_prediction":
        a, s = alpha_sigma(schedule, t)
        return a * eps - s * x0
    return x0


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The descending int64 timesteps of ``DDIMScheduler.set_timesteps(num_steps)``.

    As in diffusers, ``steps_offset`` only shifts the ``leading`` spacing.
    """
    n_train = schedule.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {n_train}]")
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
    if schedule.timestep_spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio)[::-1].astype(np.int64) + schedule.steps_offset
    ratio = n_train / num_steps
    return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1


def ddim_prev_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The timestep each DDIM step lands on, ``t - num_train_timesteps // num_steps``.

    diffusers computes it this way rather than taking the next entry of the
    timestep list; the two differ for ``linspace`` spacing and for step counts
    that do not divide ``num_train_timesteps``. Negative means "the end".
    """
    return ddim_timesteps(schedule, num_steps) - schedule.num_train_timesteps // num_steps


def ddim_step(schedule: NoiseSchedule, output: jax.Array, t, prev_t, x_t: jax.Array) -> jax.Array:
    """One deterministic (eta = 0) DDIM update from x_t to x_{prev_t}.

    For prev_t < 0 the target abar is 1 if ``set_alpha_to_one`` else abar_0.
    With ``clip_sample`` the predicted x0 is clipped to +-``clip_sample_range``;
    the predicted noise is taken from the unclipped output, as diffusers does.
    """
    x0 = to_x0(schedule, output, x_t, t)
    eps = to_epsilon(schedule, output, x_t, t)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    abar = jnp.asarray(schedule.alphas_cumprod)
    final_abar = 1.0 if schedule.set_alpha_to_one else abar[0]
    prev_t = jnp.asarray(prev_t)
    abar_prev = _per_sample(jnp.where(prev_t >= 0, abar[jnp.maximum(prev_t, 0)], final_abar))
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps


def ddim_sample(
    denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    schedule: NoiseSchedule,
    num_steps: int,
) -> jax.Array:
    """Run the whole DDIM chain from pure noise ``x_T`` (NHWC) and return x0.

    ``denoise_fn(x, t)`` gets the current latents and t as an int32 array of
    shape (B,), and returns the model output of the schedule's prediction type
    (classifier-free guidance, if any, happens inside it). The loop is one
    ``jax.lax.scan``, so wrapping this call in ``jax.jit`` (``num_steps``
    static) compiles a single program.

    diffusers' pipelines start from ``randn * scheduler.init_noise_sigma``;
    that factor is 1.0 for DDIM, so ``x_T`` is plain standard normal noise.
    """
    batch = x_T.shape[0]
    timesteps = jnp.asarray(ddim_timesteps(schedule, num_steps), dtype=jnp.int32)
    prev_timesteps = jnp.asarray(ddim_prev_timesteps(schedule, num_steps), dtype=jnp.int32)

    def step(x, ts):
        t, prev_t = ts
        output = denoise_fn(x, jnp.full((batch,), t, dtype=jnp.int32))
        return ddim_step(schedule, output, t, prev_t, x).astype(x.dtype), None

    x0, _ = jax.lax.scan(step, x_T, (timesteps, prev_timesteps))
    return x0
