"""The default step makes no float32-rate matmul on any backend: it is lowered as a GPU and as a TPU would run
it (``lowering_platforms``; no accelerator needed) and every dot and convolution's precision is read from the
program (docs/bf16.md, "What each precision costs")."""

import os

import jax
import jax.numpy as jnp
import pytest

from swiftbrush_jax.files import checkpoint as ckpt
from swiftbrush_jax import plan, precision
from swiftbrush_jax.parallel import sharding
from swiftbrush_jax.config_base import base_config, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 2


def default_step_config(**overrides):
    """configs/tiny.py's teacher with the SD 2.1 configs' dtypes and score settings (base_config's)."""
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    base = base_config()
    for key in ("teacher_dtype", "student_compute_dtype", "score_dtype", "score_precision"):
        config[key] = base[key]
    for key, value in overrides.items():
        config[key] = value
    config.sample_every = 0
    return config


def lowered_census(config, platform: str) -> dict:
    pipe = plan.abstract_pipeline(plan.model_configs(config)[0])
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    step = plan.abstract_step(config, pipe, mesh)
    ids = jax.ShapeDtypeStruct(step.token_shape(BATCH), jnp.int32, sharding=step.batch_sharding)
    lowered = step.step.trace(step.state, step.frozen, ids).lower(lowering_platforms=(platform,))
    return precision.census(lowered.as_text())


@pytest.fixture(scope="module")
def censuses():
    """The default step's and the all-bf16 step's census, lowered for each backend."""
    return {(name, platform): lowered_census(default_step_config(**overrides), platform)
            for name, overrides in (("default", {}), ("bf16", {"score_dtype": ""}))
            for platform in ("cuda", "tpu")}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_default_step_has_no_highest_precision_matmul(censuses, platform):
    counts = censuses[("default", platform)]
    by_precision = precision.precision_counts(counts)
    assert "HIGHEST" not in by_precision, by_precision
    # The score evaluations' float32 matmuls are at HIGH (TF32 on a GPU, 3-pass bf16 on a TPU), and they are
    # the four guided scores' share of the step: about 4 of its 11 UNet forward-equivalents. The only other
    # float32 operands are the bf16 UNets' attention probabilities (kept in float32) in their backward pass,
    # at the backend's default.
    high = {key: entry for key, entry in counts.items() if key[2] == "HIGH"}
    assert high and all(key[1] == "f32" for key in high), high
    rest = {key for key in counts if "f32" in key[1] and key[2] != "HIGH"}
    assert rest <= {("dot_general", "f32/bf16", "DEFAULT")}, rest
    share = sum(e["flops"] for e in high.values()) / sum(e["flops"] for e in counts.values())
    assert 0.2 < share < 0.5, share


def test_highest_is_what_the_count_sees(censuses):
    """The old default, score_precision="highest", is counted as such: the check above can fail."""
    counts = lowered_census(default_step_config(score_precision="highest"), "cuda")
    assert precision.precision_counts(counts).get("HIGHEST", 0) > 0
    assert precision.pass_flops(counts, "gpu") > 3 * precision.pass_flops(censuses[("default", "cuda")], "gpu")


def test_default_step_costs_against_the_all_bf16_step(censuses):
    """Matmul FLOPs are the same; their cost in bf16 passes is what the precision adds."""
    for platform, kind in (("cuda", "gpu"), ("tpu", "tpu")):
        default, bf16 = censuses[("default", platform)], censuses[("bf16", platform)]
        flops = lambda c: sum(e["flops"] for e in c.values())
        assert flops(default) == pytest.approx(flops(bf16), rel=1e-6)
        ratio = precision.pass_flops(default, kind) / precision.pass_flops(bf16, kind)
        assert 1.2 < ratio < (2.2 if kind == "tpu" else 1.8), (kind, ratio)


def test_census_counts_flops_and_precision():
    """Hand-counted: a dot (4x8 @ 8x3), a batched dot, a 3x3 convolution, each at a known precision."""
    def program(a, b, c, image, kernel):
        x = jnp.dot(a, b, precision="highest")
        y = jnp.einsum("bij,bjk->bik", c, c.transpose(0, 2, 1))
        z = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="high")
        return x, y, z

    args = (jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 3), jnp.float32),
            jax.ShapeDtypeStruct((2, 5, 6), jnp.bfloat16), jax.ShapeDtypeStruct((1, 7, 7, 4), jnp.float32),
            jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32))
    counts = precision.census(jax.jit(program).lower(*args).as_text())
    assert counts == {
        ("dot_general", "f32", "HIGHEST"): {"count": 1, "flops": 2 * 4 * 3 * 8},
        ("dot_general", "bf16", "DEFAULT"): {"count": 1, "flops": 2 * 2 * 5 * 5 * 6},
        ("convolution", "f32", "HIGH"): {"count": 1, "flops": 2 * 7 * 7 * 16 * 3 * 3 * 4},
    }
    assert precision.pass_flops(counts, "tpu") == 6 * 192 + 600 + 3 * 56448
    assert precision.pass_flops(counts, "gpu") == 16 * 192 + 600 + 2 * 56448


def test_resume_on_another_backend_says_what_the_score_matmuls_became():
    config = default_step_config()
    record = ckpt.config_record(config)
    assert record["score_matmuls"] == precision.score_matmuls("tensorfloat32", jax.default_backend())
    saved = dict(record, score_matmuls=precision.score_matmuls("tensorfloat32", "gpu"))
    allowed, refused = ckpt.config_changes(saved, config)
    assert refused == [] and allowed == [f"score_matmuls: 'TF32 on gpu' -> {record['score_matmuls']!r}"]
    assert precision.score_matmuls("tensorfloat32", "tpu") == "3-pass bf16 on tpu"
    assert precision.score_matmuls("highest", "cuda") == "FP32 without tensor cores on gpu"
