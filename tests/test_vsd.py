"""The JAX VSD step against the independent PyTorch reference of docs/method.md §3 (tests/vsd_reference.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import reference
import vsd_reference as ref
from swiftbrush_jax.lora import init_lora
from swiftbrush_jax.models.unet import load_unet
from swiftbrush_jax.schedule import NoiseSchedule
from swiftbrush_jax.tiny import SD21_SCHEDULER
from swiftbrush_jax.vsd import VSD, Noise, VSDConfig, make_optimizer
from swiftbrush_jax.weights import params_to_state_dict

RANK, ALPHA, B, HW = 4, 8.0, 2, 8


def nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))


def lora_to_flat(lora):
    return {".".join(p[:-1]) + "." + p[-1]: np.asarray(v) for p, v in traverse_util.flatten_dict(lora).items()}


def flat_to_lora(flat, like):
    paths = traverse_util.flatten_dict(like)
    return traverse_util.unflatten_dict({p: jnp.asarray(flat[".".join(p[:-1]) + "." + p[-1]]) for p in paths})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    teacher_pt = reference.make_unet("sd15", seed=0)
    student_pt = reference.make_unet("sd15", seed=1)
    root = tmp_path_factory.mktemp("vsd")
    teacher_pt.save_pretrained(root / "teacher")
    student_pt.save_pretrained(root / "student")
    teacher_unet, teacher_params = load_unet(str(root / "teacher"))
    _, student_params = load_unet(str(root / "student"))

    lora_pt_unet, loras = ref.add_lora(teacher_pt, RANK, ALPHA, seed=3)
    g = torch.Generator().manual_seed(4)
    flat = ref.get_lora_weights(loras)
    for k in flat:  # nonzero up-weights so the LoRA teacher differs from the teacher
        if k.endswith(".up"):
            flat[k] = 0.05 * torch.randn(flat[k].shape, generator=g).numpy()
    ref.set_lora_weights(loras, flat)
    lora = flat_to_lora(flat, init_lora(jax.random.PRNGKey(0), teacher_params, RANK))

    schedule = NoiseSchedule.from_config(SD21_SCHEDULER)
    vsd = VSD(student_unet=teacher_unet, teacher_unet=teacher_unet.clone(lora_scale=ALPHA / RANK), text_encoder=None,
              schedule=schedule, config=VSDConfig(), student_tx=make_optimizer(1e-4), lora_tx=make_optimizer(1e-3),
              latent_shape=(HW, HW, 4))

    torch.manual_seed(5)
    d = teacher_pt.config.cross_attention_dim
    inputs = dict(cond=torch.randn(B, 7, d), uncond=torch.randn(1, 7, d), z=torch.randn(B, 4, HW, HW),
                  t_vsd=torch.tensor([37, 912]), eps_vsd=torch.randn(B, 4, HW, HW), t_lora=torch.tensor([5, 640]),
                  eps_lora=torch.randn(B, 4, HW, HW), drop_mask=torch.tensor([True, False]))
    return dict(teacher_pt=teacher_pt, student_pt=student_pt, lora_pt_unet=lora_pt_unet, loras=loras, vsd=vsd,
                grads_fn=jax.jit(vsd.losses_and_grads), update_fn=jax.jit(vsd.apply_grads),
                teacher=teacher_params, student=student_params, lora=lora, schedule=schedule, inputs=inputs)


def jax_noise(i):
    return Noise(z=nhwc(i["z"]), t_vsd=jnp.asarray(i["t_vsd"].numpy(), jnp.int32), eps_vsd=nhwc(i["eps_vsd"]),
                 t_lora=jnp.asarray(i["t_lora"].numpy(), jnp.int32), eps_lora=nhwc(i["eps_lora"]),
                 drop=jnp.asarray(i["drop_mask"].numpy()))


def ours(s, **overrides):
    i = {**s["inputs"], **overrides}
    return s["grads_fn"](s["student"], s["lora"], s["teacher"], jnp.asarray(i["cond"].numpy()), jnp.asarray(i["uncond"].numpy()),
              jax_noise(i))


@pytest.fixture(scope="module")
def results(setup):
    s = setup
    i = s["inputs"]
    expected = ref.vsd_step_reference(s["student_pt"], s["teacher_pt"], s["lora_pt_unet"], i["cond"], i["uncond"],
                                      i["z"], i["t_vsd"], i["eps_vsd"], i["t_lora"], i["eps_lora"], i["drop_mask"],
                                      s["schedule"].alphas_cumprod)
    return expected, ours(s)


def test_losses_match_reference(results):
    expected, (metrics, _, _) = results
    assert expected["loss_student"] > 0 and expected["loss_lora"] > 0
    np.testing.assert_allclose(float(metrics["loss_student"]), expected["loss_student"], rtol=2e-4)
    np.testing.assert_allclose(float(metrics["loss_lora"]), expected["loss_lora"], rtol=2e-4)


def test_student_gradient_matches_reference(results):
    expected, (_, student_grads, _) = results
    got = params_to_state_dict(student_grads)
    assert set(got) == set(expected["student_grads"])
    total = np.sqrt(sum(np.sum(v**2) for v in expected["student_grads"].values()))
    assert total > 0
    for name, want in expected["student_grads"].items():
        # x0 - (x0 - grad) loses ~1e-6 absolute in float32 (|x0| ~ 15 at t=999), so compare per tensor in norm.
        assert np.linalg.norm(got[name] - want) <= 2e-3 * np.linalg.norm(want) + 1e-4 * total, name


def test_lora_gradient_matches_reference(results):
    expected, (_, _, lora_grads) = results
    got = lora_to_flat(lora_grads)
    assert set(got) == set(expected["lora_grads"])
    for name, want in expected["lora_grads"].items():
        assert rel(got[name], want) <= 1e-3, name


def test_microbatches_give_the_whole_batch_losses_and_gradients(setup, results):
    """The batch of 2 run as 2 sequential chunks: same losses, x0 spread and gradients (float32 sums)."""
    s = setup
    _, (want_metrics, want_student, want_lora) = results
    i = s["inputs"]
    chunked = dataclasses.replace(s["vsd"], microbatches=2)
    metrics, student_grads, lora_grads = jax.jit(chunked.accumulated_losses_and_grads)(
        s["student"], s["lora"], s["teacher"], jnp.asarray(i["cond"].numpy()), jnp.asarray(i["uncond"].numpy()),
        jax_noise(i))
    assert set(metrics) == set(want_metrics) == {"loss_student", "loss_lora", "x0_std"}
    for k in metrics:
        np.testing.assert_allclose(float(metrics[k]), float(want_metrics[k]), rtol=5e-5, err_msg=k)
    # Per tensor, in norm: the batch size changes XLA's convolution reductions (~1e-6 absolute), and the
    # student's residual x0 - (x0 - grad) cancels at |x0| ~ 15 (see test_student_gradient_matches_reference).
    for got, want in ((student_grads, want_student), (lora_grads, want_lora)):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
            assert rel(a, b) <= 5e-4, (jax.tree_util.keystr(path), rel(a, b))


def test_full_update_matches_reference(setup, results):
    """Same gradients in, same parameters out: clipping, both Adam chains and the EMA."""
    s = setup
    expected, _ = results
    vsd = s["vsd"]
    state = vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"])
    state = state.replace(step=jnp.asarray(3, jnp.int32), ema=jax.tree_util.tree_map(lambda x: x * 0.5, state.ema))
    student_grads = {k: v for k, v in expected["student_grads"].items()}
    lora_grads = flat_to_lora(expected["lora_grads"], s["lora"])
    from swiftbrush_jax.weights import state_dict_to_params

    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s["student"])
    g_student = state_dict_to_params(student_grads, shapes, "grads")
    metrics = {"loss_student": jnp.float32(1), "loss_lora": jnp.float32(1)}
    new, out = s["update_fn"](state, g_student, lora_grads, metrics, state.rng)
    assert bool(out["finite"])

    ema_pt = {k: v.clone() * 0.5 for k, v in s["student_pt"].state_dict().items()}
    student_pt = reference.make_unet("sd15", seed=1)
    loras = {p: m for p, m in s["loras"].items()}
    saved = ref.get_lora_weights(loras)
    ref.reference_update(student_pt, loras, expected, student_lr=1e-4, lora_lr=1e-3, ema=ema_pt, step=3)
    try:
        got_student = params_to_state_dict(new.student)
        got_ema = params_to_state_dict(new.ema)
        for name, want in student_pt.state_dict().items():
            np.testing.assert_allclose(got_student[name], want.numpy(), atol=2e-6, err_msg=name)
            np.testing.assert_allclose(got_ema[name], ema_pt[name].numpy(), atol=2e-6, err_msg=name)
        got_lora = lora_to_flat(new.lora)
        for name, want in ref.get_lora_weights(loras).items():
            np.testing.assert_allclose(got_lora[name], want, atol=2e-6, err_msg=name)
            assert np.abs(want - saved[name]).max() > 1e-4  # the update did move the LoRA weights
    finally:
        ref.set_lora_weights(loras, saved)


def test_each_tree_gets_gradient_only_from_its_own_loss(setup, results):
    s = setup
    _, (m0, gs0, gl0) = results
    i = s["inputs"]
    torch.manual_seed(9)
    # New LoRA-loss randomness: student gradients stay bit-identical, LoRA gradients change.
    m1, gs1, gl1 = ours(s, eps_lora=torch.randn_like(i["eps_lora"]), t_lora=torch.tensor([300, 20]),
                        drop_mask=torch.tensor([False, True]))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(gs0), jax.tree_util.tree_leaves(gs1)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(gl0), jax.tree_util.tree_leaves(gl1)))
    # New VSD randomness: LoRA gradients stay bit-identical, student gradients change.
    m2, gs2, gl2 = ours(s, eps_vsd=torch.randn_like(i["eps_vsd"]), t_vsd=torch.tensor([500, 100]))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(gl0), jax.tree_util.tree_leaves(gl2)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(gs0), jax.tree_util.tree_leaves(gs2)))


def test_zero_up_lora_teacher_equals_teacher(setup):
    s = setup
    fresh = init_lora(jax.random.PRNGKey(1), s["teacher"], RANK)
    unet = s["vsd"].teacher_unet
    x = jax.random.normal(jax.random.PRNGKey(2), (B, HW, HW, 4))
    t = jnp.asarray([10, 700])
    ctx = jnp.asarray(s["inputs"]["cond"].numpy())
    plain = unet.apply({"params": s["teacher"]}, x, t, ctx)
    adapted = unet.apply({"params": s["teacher"], "lora": fresh}, x, t, ctx)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(adapted))
    # With zero up-weights the VSD gradient vanishes, so does the student's gradient.
    i = s["inputs"]
    _, gs, _ = s["grads_fn"](s["student"], fresh, s["teacher"], ctx,
                                                  jnp.asarray(i["uncond"].numpy()), jax_noise(i))
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(gs))


def test_nonfinite_update_is_skipped(setup):
    s = setup
    vsd = s["vsd"]
    state = vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"])
    nan_grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), s["student"])
    zero_lora = jax.tree_util.tree_map(jnp.zeros_like, s["lora"])
    metrics = {"loss_student": jnp.float32(1), "loss_lora": jnp.float32(1)}
    new, out = s["update_fn"](state, nan_grads, zero_lora, metrics, state.rng)
    assert not bool(out["finite"]) and int(new.skipped) == 1 and int(new.skip_streak) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((state.student, state.ema, state.lora, state.student_opt)),
                    jax.tree_util.tree_leaves((new.student, new.ema, new.lora, new.student_opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
