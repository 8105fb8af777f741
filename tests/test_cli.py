"""The commands behave alike: --help shows a runnable example, a bad flag is one `error:` line and status 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "sample", "export", "evaluate", "plan", "merge", "serve")


def run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command):
    out = run(f"swiftbrush_jax.{command}", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"python -m swiftbrush_jax.{command} --" in out.stdout + out.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_flag_is_one_error_line(command):
    """(The required flags missing are reported first where a command has them.)"""
    out = run(f"swiftbrush_jax.{command}", "--no-such-flag")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: "), out.stderr[-2000:]
    assert not [line for line in errors if line.startswith("usage:")] and "Traceback" not in out.stderr


def test_evaluate_help_lists_every_suite():
    out = run("swiftbrush_jax.evaluate", "--help")
    assert "{shapes,coco2014,hps}" in out.stdout


def test_v2_configs_are_the_papers_two_students():
    """configs/sd21_v2.py:a is a full student from SD-Turbo; :b a LoRA student with the clamped CLIP loss."""
    from swiftbrush_jax.config_base import load_config_file

    path = os.path.join(ROOT, "configs", "sd21_v2.py")
    a, b = load_config_file(path, "a"), load_config_file(path, "b")
    assert a.student_init == "stabilityai/sd-turbo" and a.student_lora.rank == 0 and a.vsd.clip_weight == 0
    assert (b.student_lora.rank, b.student_lora.alpha, b.student_init) == (256, 512.0, "")
    assert (b.vsd.clip_weight, b.vsd.clip_tau, b.vsd.clip_anneal_steps) == (0.1, 0.35, b.total_steps)
    with pytest.raises(KeyError, match="sd21_v2.py:c is not a variant; the variants: a, b"):
        load_config_file(path, "c")
    out = run("swiftbrush_jax.train", "--config", "configs/sd21_v2.py:c", "--workdir", "unused")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == ("error: configs/sd21_v2.py:c is not a "
                                                                           "variant; the variants: a, b"), out.stderr


def test_an_unknown_shapes_variant_is_one_error_line_naming_the_variants(tmp_path):
    from swiftbrush_jax.config_base import load_config_file

    with pytest.raises(KeyError, match="shapes.py:nope is not a variant; the variants: v1, v2_b"):
        load_config_file(os.path.join(ROOT, "configs", "shapes.py"), "nope")
    out = run("swiftbrush_jax.train", "--config", "configs/shapes.py:nope", "--workdir", str(tmp_path / "w"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: configs/shapes.py:nope is not a variant; the variants: v1, v2_b"], out.stderr[-2000:]
    assert not (tmp_path / "w").exists()
