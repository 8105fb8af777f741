"""Sanity checks of the PyTorch VSD reference itself, before the JAX step is compared against it."""

import copy

import numpy as np
import pytest
import torch

from reference import make_unet
from vsd_reference import (LoRALinear, add_lora, get_lora_weights, reference_update, set_lora_weights,
                           vsd_step_reference)

BATCH, TOKENS, DIM, SIZE = 2, 5, 24, 8  # tiny "sd15" UNet: cross_attention_dim 24


def scaled_linear_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


ABAR = scaled_linear_alphas_cumprod()


def make_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(
        cond=torch.randn(BATCH, TOKENS, DIM, generator=g),
        uncond=torch.randn(1, TOKENS, DIM, generator=g),
        z=torch.randn(BATCH, 4, SIZE, SIZE, generator=g),
        t_vsd=torch.randint(20, 981, (BATCH,), generator=g),
        eps_vsd=torch.randn(BATCH, 4, SIZE, SIZE, generator=g),
        t_lora=torch.randint(0, 1000, (BATCH,), generator=g),
        eps_lora=torch.randn(BATCH, 4, SIZE, SIZE, generator=g),
        drop_mask=torch.tensor([False, True]),
        alphas_cumprod=ABAR,
    )


def random_up(loras, seed, std=0.05):
    """LoRA weights with a non-zero up matrix, so the LoRA teacher differs from the teacher."""
    rng = np.random.default_rng(seed)
    flat = get_lora_weights(loras)
    for name in flat:
        if name.endswith(".up"):
            flat[name] = (std * rng.standard_normal(flat[name].shape)).astype(np.float32)
    set_lora_weights(loras, flat)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded; extra threads only fight over a loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = make_unet("sd15", seed=0)
    student = make_unet("sd15", seed=1)
    lora_teacher, loras = add_lora(teacher, rank=4, alpha=6.0, seed=0)
    return student, teacher, lora_teacher, loras


def run(nets, **overrides):
    student, teacher, lora_teacher, _ = nets
    return vsd_step_reference(student, teacher, lora_teacher, **{**make_inputs(0), **overrides})


def test_lora_paths_and_jax_layout(nets):
    _, teacher, _, loras = nets
    assert len(loras) == 16  # to_q and to_v of attn1 and attn2 in 4 transformer blocks
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in loras
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_v" in loras
    assert isinstance(teacher.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
                      torch.nn.Linear)  # the teacher itself is untouched

    lora = copy.deepcopy(loras["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"])
    random_up({"m": lora}, seed=1)
    flat = get_lora_weights({"m": lora})
    assert flat["m.down"].shape == (lora.base.in_features, 4)
    assert flat["m.up"].shape == (4, lora.base.out_features)
    x = np.random.default_rng(0).standard_normal((3, lora.base.in_features)).astype(np.float32)
    w = lora.base.weight.detach().numpy()
    expected = x @ w.T + lora.scale * (x @ flat["m.down"] @ flat["m.up"])  # to_v has no bias
    with torch.no_grad():
        np.testing.assert_allclose(lora(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-6)

    set_lora_weights({"m": lora}, {k: v * 2 for k, v in flat.items()})
    np.testing.assert_array_equal(get_lora_weights({"m": lora})["m.up"], flat["m.up"] * 2)


def test_zero_up_gives_zero_student_gradient(nets):
    """With up = 0 the LoRA teacher is the teacher, so e_teacher == e_lora and the VSD gradient vanishes."""
    result = run(nets)
    assert torch.count_nonzero(result["vsd_grad"]) == 0
    assert result["loss_student"] == 0.0
    assert all(not g.any() for g in result["student_grads"].values())
    assert result["loss_lora"] > 0
    assert any(g.any() for name, g in result["lora_grads"].items() if name.endswith(".up"))


def test_student_gradient_is_the_chain_rule(nets):
    """The surrogate loss must give d loss / d x0 = grad / numel with grad = s_t^2 (e_teacher - e_lora)."""
    student, teacher, lora_teacher, loras = nets
    saved = get_lora_weights(loras)
    random_up(loras, seed=2)
    try:
        inputs = make_inputs(0)
        result = run(nets)

        # The same quantities written out again, independently of the module under test.
        abar, t = ABAR, inputs["t_vsd"]
        uncond = inputs["uncond"].repeat(BATCH, 1, 1)
        e = student(inputs["z"], 999, encoder_hidden_states=inputs["cond"]).sample
        x0 = (inputs["z"] - (1 - abar[999]).sqrt() * e) / abar[999].sqrt()
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        with torch.no_grad():
            x_t = a * x0 + s * inputs["eps_vsd"]
            guided = []
            for net in (teacher, lora_teacher):
                eu = net(x_t, t, encoder_hidden_states=uncond).sample
                ec = net(x_t, t, encoder_hidden_states=inputs["cond"]).sample
                guided.append(eu + 4.5 * (ec - eu))
            grad_const = s**2 * (guided[0] - guided[1])
        assert grad_const.abs().max() > 0
        torch.testing.assert_close(result["x0"], x0.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["vsd_grad"], grad_const, rtol=1e-4, atol=1e-6)
        assert result["loss_student"] == pytest.approx(0.5 * grad_const.pow(2).mean().item(), rel=1e-5)

        # x0 - (x0 - grad) rounds in float32 (|x0| ~ 15 at t=999, ulp ~ 1e-6), so compare per tensor in norm.
        names, params = zip(*student.named_parameters())
        expected = torch.autograd.grad((x0 * grad_const).sum() / x0.numel(), params, allow_unused=True)
        checked = 0
        for name, g in zip(names, expected):
            if g is not None:
                error = np.linalg.norm(result["student_grads"][name] - g.numpy())
                assert error <= 1e-3 * np.linalg.norm(g.numpy()), name
                checked += 1
        assert checked > 0.9 * len(names)
    finally:
        set_lora_weights(loras, saved)


def test_each_loss_moves_only_its_own_tree(nets):
    _, _, _, loras = nets
    saved = get_lora_weights(loras)
    random_up(loras, seed=3)
    try:
        base = run(nets)
        assert base["loss_student"] > 0

        # LoRA-side inputs change the LoRA loss and grads, never the student's.
        lora_side = run(nets, eps_lora=-make_inputs(0)["eps_lora"], t_lora=torch.tensor([5, 900]),
                        drop_mask=torch.tensor([True, False]))
        assert lora_side["loss_student"] == base["loss_student"]
        for name, g in base["student_grads"].items():
            np.testing.assert_array_equal(lora_side["student_grads"][name], g)
        assert lora_side["loss_lora"] != base["loss_lora"]
        assert any(not np.array_equal(lora_side["lora_grads"][k], g) for k, g in base["lora_grads"].items())

        # VSD-side inputs change the student grads, never the LoRA's (x0 is the same).
        vsd_side = run(nets, eps_vsd=-make_inputs(0)["eps_vsd"], t_vsd=torch.tensor([100, 700]))
        assert vsd_side["loss_lora"] == base["loss_lora"]
        for name, g in base["lora_grads"].items():
            np.testing.assert_array_equal(vsd_side["lora_grads"][name], g)
        assert any(not np.array_equal(vsd_side["student_grads"][k], g) for k, g in base["student_grads"].items())

        # The LoRA weights do enter the student loss, through e_lora only.
        flat = get_lora_weights(loras)
        first_up = next(k for k in flat if k.endswith(".up"))
        flat[first_up] = flat[first_up] + 0.5
        set_lora_weights(loras, flat)
        assert run(nets)["loss_student"] != base["loss_student"]
    finally:
        set_lora_weights(loras, saved)


def test_lora_loss_value_with_prompt_drop(nets):
    """loss_lora = mean(abar_t' (lora_teacher(x_t', t', c') - eps')^2), c' = uncond where drop_mask."""
    _, _, lora_teacher, _ = nets
    inputs = make_inputs(0)
    result = run(nets)
    t, eps = inputs["t_lora"], inputs["eps_lora"]
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * result["x0"] + (1 - abar).sqrt() * eps
    prompts = torch.cat([inputs["cond"][:1], inputs["uncond"]])  # drop_mask = [False, True]
    with torch.no_grad():
        out = lora_teacher(x_t, t, encoder_hidden_states=prompts).sample
    assert result["loss_lora"] == pytest.approx((abar * (out - eps) ** 2).mean().item(), rel=1e-5)


def test_v_prediction_conversions(nets):
    student, _, lora_teacher, _ = nets
    inputs = make_inputs(0)
    result = run(nets, prediction_type="v_prediction")
    assert all(not g.any() for g in result["student_grads"].values())  # up = 0 still cancels

    with torch.no_grad():
        v = student(inputs["z"], 999, encoder_hidden_states=inputs["cond"]).sample
    x0 = ABAR[999].sqrt() * inputs["z"] - (1 - ABAR[999]).sqrt() * v
    torch.testing.assert_close(result["x0"], x0, rtol=1e-5, atol=1e-5)

    t, eps = inputs["t_lora"], inputs["eps_lora"]
    a = ABAR[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ABAR[t]).sqrt().view(-1, 1, 1, 1)
    prompts = torch.cat([inputs["cond"][:1], inputs["uncond"]])
    with torch.no_grad():
        out = lora_teacher(a * x0 + s * eps, t, encoder_hidden_states=prompts).sample
    expected = (a**2 * (out - (a * eps - s * x0)) ** 2).mean().item()
    assert result["loss_lora"] == pytest.approx(expected, rel=1e-5)


def test_update_is_a_first_adam_step():
    """Adam's first step moves every parameter by lr * sign(grad), wherever the clipped grad >> eps."""
    torch.manual_seed(0)
    teacher = make_unet("sd15", seed=0)
    student = make_unet("sd15", seed=1)
    lora_teacher, loras = add_lora(teacher, rank=4, alpha=6.0, seed=0)
    random_up(loras, seed=4)
    result = vsd_step_reference(student, teacher, lora_teacher, **make_inputs(0))
    before_lora = get_lora_weights(loras)
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    ema = {k: v.clone() for k, v in before_student.items()}

    lr, student_lr = 1e-3, 1e-6
    reference_update(student, loras, result, student_lr=student_lr, lora_lr=lr, ema=ema, step=0)

    def check_tree(before, after, grads, lr):
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
        clipped = {k: g * min(1.0, 1.0 / (norm + 1e-6)) for k, g in grads.items()}
        moved = 0
        for name, g in clipped.items():
            step = after[name] - before[name]
            rounding = 2 * np.spacing(np.abs(before[name]))  # float32 ulps dominate at lr 1e-6
            big = np.abs(g) > 1e-5  # eps = 1e-8 then changes the step by < 0.1 %
            assert np.all(np.abs(step + lr * np.sign(g))[big] <= (1e-2 * lr + rounding)[big]), name
            assert np.all(np.abs(step) <= 1.001 * lr + rounding), name
            moved += big.sum()
        assert moved > 0

    check_tree(before_lora, get_lora_weights(loras), result["lora_grads"], lr)
    after_student = {k: v.numpy() for k, v in student.state_dict().items()}
    check_tree({k: v.numpy() for k, v in before_student.items()}, after_student, result["student_grads"],
               student_lr)

    # EMA at k = 0: decay = 1/10.
    for name, value in ema.items():
        expected = 0.1 * before_student[name] + 0.9 * student.state_dict()[name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
