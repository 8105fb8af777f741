"""The JAX VSD step against the independent PyTorch reference of docs/method.md §3 (tests/vsd_reference.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

import reference
import vsd_calls
import vsd_reference as ref
from swiftbrush_jax.lora import SUPPORTED_TARGETS, init_lora
from swiftbrush_jax.models.unet import load_unet
from swiftbrush_jax.schedule import NoiseSchedule
from swiftbrush_jax.models.presets import DDPM_SCHEDULER as SD21_SCHEDULER
from swiftbrush_jax.optim import make_optimizer
from swiftbrush_jax.vsd import VSD, Frozen, Noise, VSDConfig
from swiftbrush_jax.files.weights import params_to_state_dict

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
                grads_fn=vsd_calls.jit_gradients(vsd), update_fn=vsd_calls.jit_update(vsd),
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
    metrics, student_grads, lora_grads = vsd_calls.jit_gradients(chunked)(
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
    from swiftbrush_jax.files.weights import state_dict_to_params

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


VARIANTS = {  # name: (VSDConfig overrides, reference keyword arguments, teacher prediction type)
    "lora_cfg_1": (dict(lora_guidance_scale=1.0), dict(lora_guidance=1.0), "epsilon"),
    "sds_ablation": (dict(use_lora_teacher=False), dict(sds=True), "epsilon"),
    "no_x0_ablation": (dict(student_x0_parameterization=False), dict(x0_parameterization=False), "epsilon"),
    "v_prediction": ({}, dict(prediction_type="v_prediction"), "v_prediction"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_reference(setup, variant):
    """The LoRA teacher at its own guidance scale, both ablations of the paper and a v-prediction teacher:
    losses and both gradients against the independent reference."""
    s = setup
    overrides, ref_kwargs, prediction_type = VARIANTS[variant]
    schedule = NoiseSchedule.from_config({**SD21_SCHEDULER, "prediction_type": prediction_type})
    vsd = dataclasses.replace(s["vsd"], schedule=schedule, config=dataclasses.replace(s["vsd"].config, **overrides))
    i = s["inputs"]
    metrics, student_grads, lora_grads = vsd_calls.jit_gradients(vsd)(
        s["student"], s["lora"], s["teacher"], jnp.asarray(i["cond"].numpy()), jnp.asarray(i["uncond"].numpy()),
        jax_noise(i))
    expected = ref.vsd_step_reference(s["student_pt"], s["teacher_pt"], s["lora_pt_unet"], i["cond"], i["uncond"],
                                      i["z"], i["t_vsd"], i["eps_vsd"], i["t_lora"], i["eps_lora"], i["drop_mask"],
                                      schedule.alphas_cumprod, **ref_kwargs)
    np.testing.assert_allclose(float(metrics["loss_student"]), expected["loss_student"], rtol=2e-4)
    np.testing.assert_allclose(float(metrics["loss_lora"]), expected["loss_lora"], rtol=2e-4)
    got = params_to_state_dict(student_grads)
    total = np.sqrt(sum(np.sum(v**2) for v in expected["student_grads"].values()))
    assert total > 0
    for name, want in expected["student_grads"].items():
        assert np.linalg.norm(got[name] - want) <= 2e-3 * np.linalg.norm(want) + 1e-4 * total, name
    for name, want in expected["lora_grads"].items():
        assert rel(lora_to_flat(lora_grads)[name], want) <= 1e-3, name


def test_draw_ranges_and_rates(setup):
    """Timesteps cover exactly [t_min, t_max] and [lora_t_min, lora_t_max] uniformly; prompts drop at
    uncond_prob, per sample; the noises are standard normal."""
    vsd = dataclasses.replace(setup["vsd"], config=VSDConfig(t_min=20, t_max=980, uncond_prob=0.1))
    n = 20_000
    noise = jax.jit(vsd.draw, static_argnums=1)(jax.random.PRNGKey(0), n)
    t_vsd, t_lora, drop = (np.asarray(x) for x in (noise.t_vsd, noise.t_lora, noise.drop))
    assert t_vsd.min() == 20 and t_vsd.max() == 980 and t_lora.min() == 0 and t_lora.max() == 999
    # Uniform: each decile of the range holds a tenth of the draws (binomial sd ~0.002).
    for t, lo, hi in ((t_vsd, 20, 981), (t_lora, 0, 1000)):
        counts = np.histogram(t, bins=10, range=(lo, hi))[0] / n
        assert np.abs(counts - 0.1).max() < 0.012, counts
    assert abs(drop.mean() - 0.1) < 0.01  # binomial sd 0.002
    assert 0 < drop[:64].sum() < 64  # per sample, not one draw for the batch
    for x in (noise.z, noise.eps_vsd, noise.eps_lora):
        x = np.asarray(x)
        assert x.shape == (n, HW, HW, 4) and abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert not np.array_equal(np.asarray(noise.eps_vsd), np.asarray(noise.eps_lora))


def test_ema_decay_over_steps(setup):
    """EMA_{k+1} = d_k EMA_k + (1 - d_k) student_{k+1}, d_k = min(0.9999, (1 + k) / (10 + k)), k = the state's
    step; four updates from step 0 and one at a step where the cap holds."""
    s = setup
    vsd = s["vsd"]
    leaf = lambda tree: np.asarray(jax.tree_util.tree_leaves(tree)[0], np.float64)
    metrics = {"loss_student": jnp.float32(1), "loss_lora": jnp.float32(1)}
    rng = np.random.RandomState(0)
    for start in (0, 200_000):
        state = vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"]).replace(step=jnp.int32(start))
        ema = leaf(state.ema)
        for k in range(start, start + (4 if start == 0 else 1)):
            grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), s["student"])
            zero_lora = jax.tree_util.tree_map(jnp.zeros_like, s["lora"])
            state, out = s["update_fn"](state, grads, zero_lora, metrics, state.rng)
            decay = min(0.9999, (1 + k) / (10 + k))
            np.testing.assert_allclose(float(out["ema_decay"]), decay, rtol=1e-6)
            ema = decay * ema + (1 - decay) * leaf(state.student)
            np.testing.assert_allclose(leaf(state.ema), ema, rtol=1e-5, atol=1e-7)
            assert int(state.step) == k + 1


def test_optimizer_state_tree_does_not_depend_on_its_settings():
    """Clipping, weight decay, warm-up and decay change the update, not the state's tree: a run may change
    them on resume (checkpoint.CHANGEABLE_ON_RESUME) and restore the same arrays."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    trees = [jax.tree_util.tree_structure(make_optimizer(1e-3, **kw).init(params))
             for kw in ({}, {"clip": 0.0}, {"weight_decay": 0.1}, {"warmup_steps": 5, "decay_steps": 50})]
    assert all(tree == trees[0] for tree in trees)


def test_learning_rate_follows_the_state_step(setup):
    """The step's update reads its learning rate at the train state's step, the counter that the loop,
    the checkpoints and the EMA read: with a 10-step warm-up, a fresh Adam's first update at state step
    5 moves each weight by half the peak rate (Adam's first step has the size of the rate)."""
    s = setup
    lr = 1e-3
    vsd = dataclasses.replace(s["vsd"], student_tx=make_optimizer(lr, warmup_steps=10, clip=0.0))
    state = vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"]).replace(step=jnp.int32(5))
    grads = jax.tree_util.tree_map(jnp.ones_like, s["student"])
    zero_lora = jax.tree_util.tree_map(jnp.zeros_like, s["lora"])
    metrics = {"loss_student": jnp.float32(1), "loss_lora": jnp.float32(1)}
    new, _ = vsd_calls.jit_update(vsd)(state, grads, zero_lora, metrics, state.rng)
    old, moved = jax.tree_util.tree_leaves(state.student)[0], jax.tree_util.tree_leaves(new.student)[0]
    np.testing.assert_allclose(np.asarray(old - moved), lr * 5 / 10, rtol=1e-3)


def _torch_adamw(params0, grads, lrs, *, b1, b2, eps, weight_decay, clip):
    """torch.optim.AdamW with global-norm clipping, the learning rate set by hand before each step."""
    p = torch.nn.Parameter(torch.tensor(params0))
    opt = torch.optim.AdamW([p], lr=lrs[0], betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    for g, lr in zip(grads, lrs):
        p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([p], clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return p.detach().numpy()


def test_adamw_with_warmup_and_cosine_matches_torch():
    """make_optimizer's AdamW, clipping and warm-up/cosine schedule against torch's AdamW fed the schedule
    written out by hand; the learning rate follows the ``step`` it is given (the train state's)."""
    import math

    lr, warmup, decay_steps, n = 1e-2, 3, 8, 10
    def schedule(k):  # linear from 0 over ``warmup`` steps, then cosine to 0 at ``decay_steps``
        if k < warmup:
            return lr * k / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * min(k - warmup, decay_steps - warmup) / (decay_steps - warmup)))

    rng = np.random.RandomState(0)
    params0 = rng.standard_normal(16).astype(np.float32)
    grads = [rng.standard_normal(16).astype(np.float32) * 3 for _ in range(n)]
    hyper = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05, clip=1.0)
    tx = make_optimizer(lr, warmup_steps=warmup, decay_steps=decay_steps, **hyper)
    params, state = jnp.asarray(params0), tx.init(jnp.asarray(params0))
    update = jax.jit(tx.update)
    for k, g in enumerate(grads):
        updates, state = update(jnp.asarray(g), state, params, step=jnp.int32(k))
        params = params + updates
    want = _torch_adamw(params0, grads, [schedule(k) for k in range(n)], **hyper)
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5, atol=1e-6)
    # A step further on gives that step's rate: Adam's first update has size lr (signs of the gradient).
    first, _ = update(jnp.asarray(grads[0]), tx.init(jnp.asarray(params0)), jnp.zeros(16), step=jnp.int32(5))
    np.testing.assert_allclose(np.abs(np.asarray(first)), schedule(5), rtol=1e-4)


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


def test_two_time_scale_lora_updates(setup):
    """lora_updates_per_step = 3: two further LoRA updates, each on its own fresh student samples and noise, at
    the step's learning rate; the student, its EMA and its optimizer are left alone."""
    s = setup
    vsd = dataclasses.replace(s["vsd"], config=VSDConfig(lora_updates_per_step=3))
    state = vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"]).replace(step=jnp.int32(7))
    cond = jnp.asarray(s["inputs"]["cond"].numpy())
    frozen = Frozen(teacher=s["teacher"], text=None, uncond=jnp.asarray(s["inputs"]["uncond"].numpy()))
    rng = jax.random.PRNGKey(11)
    new, mean_loss = jax.jit(vsd.extra_lora_updates)(state, frozen, cond, rng, state.step)

    lora, opt, losses, draws = state.lora, state.lora_opt, [], []
    for key in jax.random.split(rng, 2):
        noise = vsd.draw(key, B)
        draws.append(noise)
        x0 = vsd.student_x0(state.student, s["teacher"], noise.z, cond)
        loss, grads = jax.value_and_grad(vsd.lora_loss)(lora, s["teacher"], x0, cond, frozen.uncond, noise)
        updates, opt = vsd.lora_tx.update(grads, opt, lora, step=jnp.int32(7))
        lora, losses = optax.apply_updates(lora, updates), losses + [loss]
    assert not np.allclose(draws[0].z, draws[1].z) and not np.array_equal(draws[0].t_lora, draws[1].t_lora)
    for a, b in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(new.lora)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=2e-6)  # lr 1e-3 steps
    assert float(mean_loss) == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert rel(jax.tree_util.tree_leaves(new.lora)[0], jax.tree_util.tree_leaves(state.lora)[0]) > 1e-4
    for a, b in zip(jax.tree_util.tree_leaves((state.student, state.ema, state.student_opt, state.step)),
                    jax.tree_util.tree_leaves((new.student, new.ema, new.student_opt, new.step))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_time_scale_updates_in_microbatches(setup):
    """Two time-scale updates and microbatches combine: the whole train step with lora_updates_per_step = 3 in 2
    chunks gives the metrics and the updates of the step on the whole batch at once. Plain gradient steps (SGD)
    make each update a multiple of the gradient, which Adam's first step, lr g / |g|, would hide."""
    s = setup
    text = nn_text_encoder(jnp.asarray(s["inputs"]["cond"].numpy()))
    frozen = Frozen(teacher=s["teacher"], text={}, uncond=jnp.asarray(s["inputs"]["uncond"].numpy()))
    sgd = lambda lr: optax.with_extra_args_support(optax.sgd(lr))
    states, outs = [], []
    for k in (1, 2):
        vsd = dataclasses.replace(s["vsd"], config=VSDConfig(lora_updates_per_step=3), microbatches=k,
                                  text_encoder=text, student_tx=sgd(1.0), lora_tx=sgd(100.0))
        state = vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"])
        new, metrics = jax.jit(vsd.train_step)(state, frozen, jnp.arange(B))
        states.append(new)
        outs.append(metrics)
    assert bool(outs[1]["finite"]) and int(states[1].step) == 1
    for name in ("loss_student", "loss_lora", "loss_lora_extra", "x0_std"):
        np.testing.assert_allclose(float(outs[1][name]), float(outs[0][name]), rtol=5e-5, err_msg=name)
    before = jax.tree_util.tree_leaves((s["student"], s["lora"]))
    for (path, a), b, start in zip(jax.tree_util.tree_leaves_with_path((states[1].student, states[1].lora)),
                                   jax.tree_util.tree_leaves((states[0].student, states[0].lora)), before):
        chunked_update, whole_update = np.asarray(a) - np.asarray(start), np.asarray(b) - np.asarray(start)
        # Each update is read back from float32 weights: up to an ulp of each weight (1.2e-7 relative) is rounding.
        gap = np.linalg.norm(chunked_update - whole_update)
        assert gap <= 5e-4 * np.linalg.norm(whole_update) + 2.4e-7 * np.linalg.norm(start), jax.tree_util.keystr(path)
    assert rel(jax.tree_util.tree_leaves(states[1].lora)[0], jax.tree_util.tree_leaves(s["lora"])[0]) > 1e-4


def test_sds_ablation_skips_the_further_lora_updates(setup):
    """The SDS ablation reads no LoRA teacher, so a config with lora_updates_per_step = 3 and no LoRA teacher
    (an SDS twin of a two time-scale recipe) takes one step's work: the state after its step is the state
    after the same step at lora_updates_per_step = 1."""
    s = setup
    text = nn_text_encoder(jnp.asarray(s["inputs"]["cond"].numpy()))
    frozen = Frozen(teacher=s["teacher"], text={}, uncond=jnp.asarray(s["inputs"]["uncond"].numpy()))
    states = []
    for updates in (1, 3):
        vsd = dataclasses.replace(s["vsd"], config=VSDConfig(use_lora_teacher=False, lora_updates_per_step=updates),
                                  text_encoder=text)
        new, metrics = jax.jit(vsd.train_step)(vsd.init_state(jax.random.PRNGKey(0), s["student"], s["lora"]),
                                               frozen, jnp.arange(B))
        assert "loss_lora_extra" not in metrics
        states.append(new)
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def nn_text_encoder(embeddings):
    """A text encoder that returns fixed prompt embeddings, row i for token ids i: the step's own code path
    from token ids on, with the test's embeddings."""
    import flax.linen as nn

    class FixedEmbeddings(nn.Module):
        @nn.compact
        def __call__(self, token_ids):
            return embeddings[token_ids]

    return FixedEmbeddings()


def test_lora_student_matches_reference(setup):
    """A LoRA student (rank 2 on every layer that takes one: q/k/v/out, the feed-forward, the transformers' 1x1
    convolutions in and out, the resnets' 1x1 shortcuts and time projections, the time embedding; adapters
    perturbed): the step's losses and the gradients of both adapter trees equal the reference's, whose student is
    the teacher plus the same adapters, differentiated with respect to them only."""
    s = setup
    rank, alpha, targets = 2, 4.0, SUPPORTED_TARGETS
    student_pt, student_loras = ref.add_lora(s["teacher_pt"], rank, alpha, targets, seed=7)
    g = torch.Generator().manual_seed(8)
    flat = ref.get_lora_weights(student_loras)
    for k in flat:
        if k.endswith(".up"):
            flat[k] = 0.05 * torch.randn(flat[k].shape, generator=g).numpy()
    ref.set_lora_weights(student_loras, flat)
    i = s["inputs"]
    expected = ref.vsd_step_reference(student_pt, s["teacher_pt"], s["lora_pt_unet"], i["cond"], i["uncond"], i["z"],
                                      i["t_vsd"], i["eps_vsd"], i["t_lora"], i["eps_lora"], i["drop_mask"],
                                      s["schedule"].alphas_cumprod, student_loras=student_loras)

    teacher_unet = s["vsd"].teacher_unet
    vsd = dataclasses.replace(s["vsd"], student_unet=teacher_unet.clone(lora_scale=alpha / rank), lora_student=True)
    student = flat_to_lora(flat, init_lora(jax.random.PRNGKey(0), s["teacher"], rank, targets))
    metrics, student_grads, lora_grads = vsd_calls.jit_gradients(vsd)(
        student, s["lora"], s["teacher"], jnp.asarray(i["cond"].numpy()), jnp.asarray(i["uncond"].numpy()),
        jax_noise(i))
    np.testing.assert_allclose(float(metrics["loss_student"]), expected["loss_student"], rtol=2e-4)
    np.testing.assert_allclose(float(metrics["loss_lora"]), expected["loss_lora"], rtol=2e-4)
    got = lora_to_flat(student_grads)
    assert set(got) == set(expected["student_grads"])
    assert all(any(name.endswith(f"{target}.down") for name in got) for target in targets)
    total = np.sqrt(sum(np.sum(v**2) for v in expected["student_grads"].values()))
    assert total > 0
    for name, want in expected["student_grads"].items():
        assert np.linalg.norm(got[name] - want) <= 2e-3 * np.linalg.norm(want) + 1e-4 * total, name
    for name, want in expected["lora_grads"].items():
        assert rel(lora_to_flat(lora_grads)[name], want) <= 1e-3, name


def test_clip_loss_matches_reference(setup, results, tmp_path):
    """SwiftBrush v2's clamped CLIP loss on x0 decoded by TAESD (random diffusers AutoencoderTiny, 8 -> 16 px)
    and scored by a random transformers CLIPModel (12 px images: an antialiased resize): its value and the
    student's gradient equal the reference's, and it changes that gradient; the LoRA gradient is untouched.
    In 2 microbatches the step gives the same losses, cosine and gradients."""
    from diffusers import AutoencoderTiny
    from transformers import CLIPConfig, CLIPModel

    from swiftbrush_jax.models.clip import load_clip_model
    from swiftbrush_jax.models.taesd import load_taesd

    s = setup
    taesd_pt = reference.randomize(AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                                   num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)), 5).eval()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=12,
                  patch_size=4)
    clip_pt = reference.randomize(CLIPModel(CLIPConfig(text_config=dict(reference.TEXT_CONFIGS["sd21"]),
                                                       vision_config=vision, projection_dim=16)), 6).eval()
    taesd_pt.save_pretrained(str(tmp_path / "taesd"))
    clip_pt.save_pretrained(str(tmp_path / "clip"))
    taesd, taesd_params = load_taesd(str(tmp_path / "taesd"))
    clip_model, clip_params = load_clip_model(str(tmp_path / "clip"))
    ids = torch.randint(2, 900, (B, 77), generator=torch.Generator().manual_seed(9))
    ids[:, 0], ids[:, 6] = 0, 1  # start, then the end-of-text token (eos id 1 here) where the text pools
    weight, tau = 10.0, 0.35  # a large w, so the CLIP term is a good part of the student gradient

    i = s["inputs"]
    expected = ref.vsd_step_reference(s["student_pt"], s["teacher_pt"], s["lora_pt_unet"], i["cond"], i["uncond"],
                                      i["z"], i["t_vsd"], i["eps_vsd"], i["t_lora"], i["eps_lora"], i["drop_mask"],
                                      s["schedule"].alphas_cumprod,
                                      clip=(clip_pt, lambda x: taesd_pt.decode(x).sample, ids, weight, tau))
    vsd = dataclasses.replace(s["vsd"], config=VSDConfig(clip_weight=weight, clip_tau=tau), clip_model=clip_model,
                              clip_decode=lambda p, x: taesd.apply({"params": p}, x, method="decode"))
    clip_inputs = ({"model": clip_params, "decoder": taesd_params}, jnp.asarray(ids.numpy(), jnp.int32),
                   jnp.float32(weight))
    metrics, student_grads, lora_grads = vsd_calls.jit_gradients(vsd)(
        s["student"], s["lora"], s["teacher"], jnp.asarray(i["cond"].numpy()), jnp.asarray(i["uncond"].numpy()),
        jax_noise(i), clip_inputs)
    assert expected["loss_clip"] > 0
    np.testing.assert_allclose(float(metrics["loss_clip"]), expected["loss_clip"], rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_student"]), expected["loss_student"], rtol=2e-4)
    got = params_to_state_dict(student_grads)
    total = np.sqrt(sum(np.sum(v**2) for v in expected["student_grads"].values()))
    for name, want in expected["student_grads"].items():
        assert np.linalg.norm(got[name] - want) <= 2e-3 * np.linalg.norm(want) + 1e-4 * total, name
    without_clip = params_to_state_dict(results[1][1])
    changed = np.sqrt(sum(np.sum((got[k] - without_clip[k]) ** 2) for k in got))
    assert changed > 0.05 * total, (changed, total)
    for a, b in zip(jax.tree_util.tree_leaves(lora_grads), jax.tree_util.tree_leaves(results[1][2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)

    # In microbatches each chunk scores its own images against its own prompts: the whole batch's values.
    chunked = dataclasses.replace(vsd, microbatches=2)
    chunk_metrics, chunk_student, chunk_lora = vsd_calls.jit_gradients(chunked)(
        s["student"], s["lora"], s["teacher"], jnp.asarray(i["cond"].numpy()), jnp.asarray(i["uncond"].numpy()),
        jax_noise(i), clip_inputs)
    assert set(chunk_metrics) == set(metrics)
    for k in metrics:
        np.testing.assert_allclose(float(chunk_metrics[k]), float(metrics[k]), rtol=5e-5, err_msg=k)
    for got_tree, want_tree in ((chunk_student, student_grads), (chunk_lora, lora_grads)):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_tree), jax.tree_util.tree_leaves(want_tree)):
            assert rel(a, b) <= 5e-4, (jax.tree_util.keystr(path), rel(a, b))
