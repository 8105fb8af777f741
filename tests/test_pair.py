"""The pair pass (swiftbrush_jax.pair): each kind of rule against float64, the whole guided difference against
the float32 subtraction, and the bf16 step's student gradient with it (docs/bf16.md)."""

import os
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vsd_calls


from swiftbrush_jax import pair, precision, setup
from swiftbrush_jax.config_base import load_config_file
from swiftbrush_jax.generate import guided
from swiftbrush_jax.lora import init_lora
from swiftbrush_jax.files.pipeline import load_pipeline
from swiftbrush_jax.toy.tiny_teacher import make_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERTURBATION = 0.005


def cosine(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


RULES = {
    # linear
    "add_reshape_sum": lambda x, y: jnp.sum((x + 2.0 * y).reshape(-1, 4), axis=0),
    "concatenate_slice_pad": lambda x, y: jnp.pad(jnp.concatenate([x, y])[1:-1], ((2, 1), (0, 0))),
    "where_cases": lambda x, y: jnp.where(jnp.arange(x.shape[1]) % 2 == 0, x, y),
    # bilinear
    "mul": lambda x, y: x * y,
    "dot": lambda x, y: x @ y.T,
    "conv": lambda x, y: jax.lax.conv_general_dilated(x.reshape(1, 6, 4, 1), y[:3, :3].reshape(3, 1, 1, 3),
                                                      (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
    # secant
    "exp_rsqrt_tanh": lambda x, y: jnp.exp(x) * jax.lax.rsqrt(1.0 + y * y) + jnp.tanh(x - y),
    "max_and_reduce_max": lambda x, y: jnp.maximum(x, 0.1) + jnp.max(y, axis=1, keepdims=True),
    "softmax_custom_jvp": lambda x, y: jax.nn.softmax(x @ y.T, axis=-1),
    "gelu_silu": lambda x, y: nn.gelu(x) + nn.silu(y),
    "nested_jit": lambda x, y: jax.jit(lambda a, b: jnp.log1p(a * a) @ b.T)(x, y),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_against_float64(name):
    """Each kind of rule: the pass's d against f(x + d) - f(x) in float64, for a small and a large d."""
    fun = RULES[name]
    keys = jax.random.split(jax.random.PRNGKey(zlib.crc32(name.encode())), 4)
    x, y = (jax.random.normal(k, (6, 4)) for k in keys[:2])
    # A float32 secant f(x + d) - f(x) cancels to about 1e-7 |f| / |d| relative: 1e-4 at d ~ 1e-3. A rule
    # that drops or linearises a term is off by O(1) at the small d or O(d) at the large one.
    for scale, tolerance in ((1e-3, 2e-3), (0.5, 1e-4)):
        dx, dy = (scale * jax.random.normal(k, (6, 4)) for k in keys[2:])
        _, d = jax.jit(lambda *a: pair.pair_apply(fun, a[:2], a[2:]))(x, y, dx, dy)
        with jax.enable_x64(True):
            x64, y64, dx64, dy64 = (np.asarray(a, np.float64) for a in (x, y, dx, dy))
            expected = fun(jnp.asarray(x64 + dx64), jnp.asarray(y64 + dy64)) - fun(jnp.asarray(x64), jnp.asarray(y64))
            expected = np.asarray(expected)
        assert rel_error(d, expected) < tolerance, (name, scale, rel_error(d, expected))


def test_none_delta_is_an_exact_zero_and_partial_trees():
    fun = lambda p, x: jnp.tanh(x @ p["w"]) + p["b"]
    p = {"b": jnp.ones(3), "w": jax.random.normal(jax.random.PRNGKey(0), (4, 3))}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    out, d = pair.pair_apply(fun, (p, x), (None, None))
    np.testing.assert_array_equal(d, np.zeros((2, 3)))
    dw = 1e-2 * jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    _, d = pair.pair_apply(fun, (p, x), ({"b": None, "w": dw}, None))
    expected = fun({"b": p["b"], "w": p["w"] + dw}, x) - out
    np.testing.assert_allclose(d, expected, rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    pipe = load_pipeline(make_tiny_pipeline(str(root / "teacher"), seed=0))
    lora = init_lora(jax.random.PRNGKey(1), pipe.unet_params, 4, ("to_q", "to_v"))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 1000))
    lora = jax.tree_util.tree_map_with_path(
        lambda path, v: PERTURBATION * jax.random.normal(next(keys), v.shape) if "up" in jax.tree_util.keystr(path)
        else v, lora)
    prompts = ["a red circle", "a blue square", "a green triangle", "a shape"]
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 4))
    t = jnp.array([30, 400, 700, 960])
    return pipe, lora, x, t, jnp.asarray(pipe.encode_text(prompts)), jnp.asarray(pipe.encode_text([""]))


@pytest.mark.parametrize("scales", [(4.5, 4.5), (3.0, 1.0)], ids=["same_cfg", "lora_at_its_own_cfg"])
def test_guided_difference_against_float32_subtraction(tiny, scales):
    """Both CFG halves, the LoRA teacher at the teacher's scale and at its own: in float32 the pass equals the
    subtraction of the two guided scores; in bf16 it keeps the difference that subtracting bf16 scores loses."""
    pipe, lora, x, t, cond, uncond = tiny
    g, g_lora = scales
    unet32 = pipe.unet.clone(lora_scale=2.0)
    unet16 = pipe.unet.clone(lora_scale=2.0, dtype=jnp.bfloat16)
    params16 = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), pipe.unet_params)

    def subtracted(unet, params):
        teacher = guided(unet, {"params": params}, x, t, cond, uncond, g)
        return teacher, guided(unet, {"params": params, "lora": lora}, x, t, cond, uncond, g_lora) - teacher

    teacher32, reference = jax.jit(lambda: subtracted(unet32, pipe.unet_params))()
    teacher_pair32, pair32 = jax.jit(lambda: pair.guided_difference(unet32, pipe.unet_params, lora, x, t, cond,
                                                                     uncond, g, g_lora))()
    assert rel_error(pair32, reference) < 2e-3
    np.testing.assert_allclose(teacher_pair32, teacher32, rtol=0, atol=1e-4)
    _, bf16_pair = jax.jit(lambda: pair.guided_difference(unet16, params16, lora, x, t, cond, uncond, g, g_lora))()
    _, bf16_subtracted = jax.jit(lambda: subtracted(unet16, params16))()
    assert cosine(bf16_pair, reference) >= 0.99
    assert cosine(bf16_pair, reference) > cosine(bf16_subtracted, reference)


def config_with(**overrides):
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    for key, value in overrides.items():
        config[key] = value
    return config


def student_gradient(pipe, lora, config, noise, cond, uncond):
    vsd = setup.build_vsd(config, pipe)
    teacher = setup.as_dtype(pipe.unet_params, jnp.dtype(config.teacher_dtype))
    _, grads, _ = vsd_calls.jit_gradients(vsd)(pipe.unet_params, lora, teacher, cond, uncond, noise)
    return np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree_util.tree_leaves(grads)])


def test_pair_step_keeps_the_float32_student_gradient_in_bf16(tiny):
    """The whole step in bf16 (teacher, text encoder, student and the pair pass): student-gradient cosine
    >= 0.99 with the float32 step at p = 0.005, where subtracting bf16 scores gives about 0.45."""
    pipe, lora, _, _, cond, uncond = tiny
    noise = setup.build_vsd(config_with(), pipe).draw(jax.random.PRNGKey(3), cond.shape[0])
    reference = student_gradient(pipe, lora, config_with(), noise, cond, uncond)
    bf16 = dict(teacher_dtype="bfloat16", student_compute_dtype="bfloat16", score_dtype="")
    paired = student_gradient(pipe, lora, config_with(score_pair=True, **bf16), noise, cond, uncond)
    subtracted = student_gradient(pipe, lora, config_with(**bf16), noise, cond, uncond)
    assert cosine(paired, reference) >= 0.99
    assert cosine(subtracted, reference) < 0.9


def test_pair_step_equals_the_subtraction_in_float32_for_a_v_prediction_teacher(tiny):
    """A v-prediction teacher: the difference converts to epsilon by the schedule, as the scores do."""
    pipe, lora, _, _, cond, uncond = tiny
    import dataclasses

    v_pipe = dataclasses.replace(pipe, schedule=dataclasses.replace(pipe.schedule, prediction_type="v_prediction"))
    noise = setup.build_vsd(config_with(), v_pipe).draw(jax.random.PRNGKey(4), cond.shape[0])
    reference = student_gradient(v_pipe, lora, config_with(), noise, cond, uncond)
    paired = student_gradient(v_pipe, lora, config_with(score_pair=True), noise, cond, uncond)
    assert rel_error(paired, reference) < 5e-3


def test_pair_step_lowers_to_bf16_matmuls_only():
    """The all-bf16 step with the pair pass, lowered for a GPU: no float32 dot or convolution in the scores,
    and its matmul FLOPs next to the all-bf16 (subtracting) step's."""
    from test_precision import default_step_config, lowered_census

    paired = lowered_census(default_step_config(score_dtype="", score_pair=True), "cuda")
    plain = lowered_census(default_step_config(score_dtype=""), "cuda")
    f32 = {key for key in paired if "f32" in key[1] and key != ("dot_general", "f32/bf16", "DEFAULT")}
    assert not f32, f32
    flops = lambda c: sum(e["flops"] for e in c.values())
    assert flops(paired) / flops(plain) < 1.3
    assert precision.pass_flops(paired, "gpu") / precision.pass_flops(plain, "gpu") < 1.3


def test_loops_are_refused_by_name():
    fun = lambda x: jax.lax.map(jnp.sin, x)
    with pytest.raises(NotImplementedError, match="scan"):
        pair.pair_apply(fun, (jnp.ones((3, 2)),), (jnp.ones((3, 2)),))


def test_pair_with_query_blocks_is_refused_in_one_line(tiny):
    pipe = tiny[0]
    with pytest.raises(setup.UsageError, match="attention_query_block=0"):
        setup.build_vsd(config_with(score_pair=True, attention_query_block=16), pipe)
