"""The JAX noise schedule and DDIM sampler against diffusers' PyTorch schedulers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from swiftbrush_jax.models import UnsupportedConfigError
from swiftbrush_jax.models.presets import SCHEDULER as SD21_CONFIG
from swiftbrush_jax.schedule import (
    NoiseSchedule,
    add_noise,
    alpha_sigma,
    ddim_prev_timesteps,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    target,
    to_epsilon,
    to_x0,
)

SD21_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 8, 8, 4)  # NHWC


def schedules(**config):
    """The same config as (ours, diffusers DDIMScheduler)."""
    return NoiseSchedule.from_config(config), DDIMScheduler.from_config(config)


def nchw(x):
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "config,maxulp",
    [
        # Bit-equal where torch's linspace uses fused multiply-adds (x86-64 with FMA);
        # one ulp of slack keeps the test honest on CPUs without them.
        (SD21_CONFIG, 1),
        (dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 1),
        (dict(beta_schedule="squaredcos_cap_v2"), 1),
        (dict(beta_schedule="linear", num_train_timesteps=333), 1),
        # Zero terminal SNR shifts and rescales sqrt(abar_t), numbers near 1, then squares: every value
        # carries the absolute rounding of numbers near 1, and torch's CPU sqrt and pow round differently
        # on different processors (8 ulps at abar ~ 0.5 on one Xeon, 44 near the end on an EPYC, where
        # abar ~ 3e-5). So here the bound is absolute: 8 float32 ulps of 1.0.
        (dict(SD21_BETAS, rescale_betas_zero_snr=True), None),
    ],
    ids=["sd21", "linear", "cosine", "linear_333", "zero_snr"],
)
@pytest.mark.parametrize("reference", [DDIMScheduler, DDPMScheduler])
def test_alphas_cumprod_equal_diffusers(config, maxulp, reference):
    ours = NoiseSchedule.from_config(config).alphas_cumprod
    theirs = reference.from_config(config).alphas_cumprod.numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    if maxulp is None:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=8 * np.finfo(np.float32).eps)
    else:
        np.testing.assert_array_max_ulp(ours, theirs, maxulp=maxulp)


def test_zero_snr_schedule_ends_at_zero():
    abar = NoiseSchedule.from_config(dict(SD21_BETAS, rescale_betas_zero_snr=True)).alphas_cumprod
    plain = NoiseSchedule.from_config(SD21_BETAS).alphas_cumprod
    assert abs(abar[-1]) < 1e-6 and plain[-1] > 1e-3
    np.testing.assert_allclose(abar[0], plain[0], rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 25, 1000])
def test_ddim_timesteps_equal_diffusers(spacing, steps_offset, num_steps):
    ours, theirs = schedules(**SD21_BETAS, timestep_spacing=spacing, steps_offset=steps_offset)
    theirs.set_timesteps(num_steps)
    got = ddim_timesteps(ours, num_steps)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, theirs.timesteps.numpy())


def test_ddim_timesteps_refuses_more_steps_than_training():
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(NoiseSchedule.from_config(SD21_CONFIG), 1001)


@pytest.mark.parametrize(
    "prediction_type,clip_sample,set_alpha_to_one",
    [
        ("epsilon", False, True),
        ("epsilon", False, False),
        ("v_prediction", False, True),
        ("v_prediction", False, False),
        ("sample", False, False),
        ("epsilon", True, True),
    ],
)
def test_ddim_step_equals_diffusers(prediction_type, clip_sample, set_alpha_to_one):
    ours, theirs = schedules(
        **SD21_BETAS, prediction_type=prediction_type, clip_sample=clip_sample,
        clip_sample_range=1.5, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
    )
    num_steps = 4
    theirs.set_timesteps(num_steps)  # timesteps 751, 501, 251, 1; the last step lands past 0
    t = ddim_timesteps(ours, num_steps)
    prev_t = ddim_prev_timesteps(ours, num_steps)
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((len(t),) + SHAPE[1:]).astype(np.float32)
    output = rng.standard_normal(x_t.shape).astype(np.float32)

    # One batch, each sample at its own timestep, jitted with traced timesteps.
    step = jax.jit(lambda o, t, p, x: ddim_step(ours, o, t, p, x))
    got = np.asarray(step(output, jnp.asarray(t), jnp.asarray(prev_t), x_t))
    for i, t_i in enumerate(t):
        expected = theirs.step(nchw(output[i : i + 1]), int(t_i), nchw(x_t[i : i + 1])).prev_sample
        np.testing.assert_allclose(got[i : i + 1], nhwc(expected), rtol=1e-5, atol=1e-5)


def analytic_denoiser_jax(x, t):
    return 0.5 * x + 0.1 * t.reshape(-1, 1, 1, 1) / 1000


def analytic_denoiser_torch(x, t):
    return 0.5 * x + 0.1 * t / 1000


def diffusers_ddim_loop(scheduler, x_T, num_steps):
    """What a diffusers pipeline does around the UNet, with the analytic denoiser in its place."""
    scheduler.set_timesteps(num_steps)
    x = nchw(x_T) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(analytic_denoiser_torch(x, t), t, x).prev_sample
    return nhwc(x)


# Every step count with both final-alpha rules; prediction type, spacing and
# clipping rotate across the cases (a full cross product compiles too long).
@pytest.mark.parametrize(
    "num_steps,set_alpha_to_one,prediction_type,spacing,clip_sample",
    [
        (1, True, "epsilon", "trailing", False),
        (1, False, "v_prediction", "leading", True),
        (2, True, "v_prediction", "linspace", False),
        (2, False, "epsilon", "leading", False),
        (4, True, "epsilon", "linspace", True),
        (4, False, "v_prediction", "trailing", False),
    ],
)
def test_ddim_sample_equals_diffusers_loop(num_steps, set_alpha_to_one, prediction_type, spacing, clip_sample):
    ours, theirs = schedules(
        **SD21_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
        set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample,
    )
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    sample = jax.jit(lambda x: ddim_sample(analytic_denoiser_jax, x, ours, num_steps))
    got = np.asarray(sample(x_T))
    np.testing.assert_allclose(got, diffusers_ddim_loop(theirs, x_T, num_steps), rtol=1e-5, atol=1e-5)


def test_ddim_sample_passes_batch_timesteps_to_denoiser():
    seen = []

    def denoiser(x, t):
        seen.append((t.shape, t.dtype))
        return jnp.zeros_like(x)

    schedule = NoiseSchedule.from_config(SD21_CONFIG)
    ddim_sample(denoiser, jnp.ones(SHAPE), schedule, 3)
    assert seen == [((SHAPE[0],), jnp.int32)]  # traced once inside the scan


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_invert_the_forward_process(prediction_type):
    schedule = NoiseSchedule.from_config(dict(SD21_BETAS, prediction_type=prediction_type))
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    t = jnp.array([0, 999])
    x_t = add_noise(schedule, x0, eps, t)
    output = target(schedule, x0, eps, t)
    np.testing.assert_allclose(to_x0(schedule, output, x_t, t), x0, atol=5e-5)
    np.testing.assert_allclose(to_epsilon(schedule, output, x_t, t), eps, atol=5e-5)


def test_alpha_sigma_shape_and_unit_norm():
    schedule = NoiseSchedule.from_config(SD21_CONFIG)
    a, s = alpha_sigma(schedule, jnp.array([0, 500, 999]))
    assert a.shape == s.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(a[2, 0, 0, 0] ** 2, 0.0046600, rtol=1e-3)  # docs/method.md §2: abar_999 ~ 0.00466
    # The schedule is a pytree: it can be a jit argument, its config staying static.
    a_jit, s_jit = jax.jit(alpha_sigma)(schedule, jnp.array([0, 500, 999]))
    np.testing.assert_array_equal(a_jit, a)
    np.testing.assert_array_equal(s_jit, s)


def test_add_noise_and_velocity_target_equal_diffusers():
    ours = NoiseSchedule.from_config(dict(SD21_BETAS, prediction_type="v_prediction"))
    theirs = DDPMScheduler.from_config(dict(SD21_BETAS, prediction_type="v_prediction"))
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([17, 980])
    np.testing.assert_allclose(
        add_noise(ours, x0, eps, t), nhwc(theirs.add_noise(nchw(x0), nchw(eps), torch.from_numpy(t))),
        rtol=1e-6, atol=1e-6,
    )
    np.testing.assert_allclose(
        target(ours, x0, eps, t), nhwc(theirs.get_velocity(nchw(x0), nchw(eps), torch.from_numpy(t))),
        rtol=1e-6, atol=1e-6,
    )


@pytest.mark.parametrize(
    "bad",
    [
        dict(thresholding=True),
        dict(beta_schedule="sigmoid"),
        dict(prediction_type="flow"),
        dict(timestep_spacing="karras"),
        dict(trained_betas=[0.1] * 1000),
    ],
    ids=lambda d: next(iter(d)),
)
def test_unsupported_options_raise(bad):
    with pytest.raises(UnsupportedConfigError, match=next(iter(bad))):
        NoiseSchedule.from_config({**SD21_CONFIG, **bad})


def test_from_folder_reads_scheduler_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_CONFIG))
    schedule = NoiseSchedule.from_folder(str(tmp_path))
    assert (schedule.prediction_type, schedule.steps_offset, schedule.set_alpha_to_one) == ("epsilon", 1, False)
    assert (schedule.clip_sample, schedule.timestep_spacing) == (False, "leading")
    np.testing.assert_array_equal(schedule.alphas_cumprod, NoiseSchedule.from_config(SD21_CONFIG).alphas_cumprod)


def test_to_ddim_config_round_trips_through_diffusers():
    schedule = NoiseSchedule.from_config(SD21_CONFIG)
    config = schedule.to_ddim_config(timestep_spacing="trailing", set_alpha_to_one=True)
    assert config["_class_name"] == "DDIMScheduler"
    theirs = DDIMScheduler.from_config(json.loads(json.dumps(config)))
    assert theirs.config.timestep_spacing == "trailing" and theirs.config.set_alpha_to_one
    assert theirs.config.steps_offset == 1 and not theirs.config.clip_sample
    np.testing.assert_array_max_ulp(schedule.alphas_cumprod, theirs.alphas_cumprod.numpy(), maxulp=1)
    theirs.set_timesteps(1)
    assert theirs.timesteps.tolist() == [999]
    again = NoiseSchedule.from_config(config)
    assert again.timestep_spacing == "trailing" and again.set_alpha_to_one
    np.testing.assert_array_equal(again.alphas_cumprod, schedule.alphas_cumprod)


def test_to_ddim_config_rejects_unknown_override():
    with pytest.raises(TypeError, match="timestep_spaceing"):
        NoiseSchedule.from_config(SD21_CONFIG).to_ddim_config(timestep_spaceing="trailing")
