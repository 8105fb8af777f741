"""The training program end to end: outputs, exact resume after SIGTERM, multi-process runs, bad input."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from swiftbrush_jax.checkpoint import read_on_one_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/tiny.py", "--config.sample_every=0", "--config.log_every=2"]


def env(devices=1):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"}


def train(workdir, *overrides, devices=1, timeout=900):
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", *TINY, "--workdir", str(workdir), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True, text=True, timeout=timeout)


def final_state(workdir, step):
    return read_on_one_device(os.path.join(workdir, "checkpoints"), step)[0]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints every 2 steps and sample grids."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = train(workdir, "--config.total_steps=8", "--config.checkpoint_every=2", "--config.sample_every=4")
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_run_writes_checkpoints_events_and_samples(reference_run):
    workdir, out = reference_run
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
    assert steps == [4, 6, 8]  # keep_checkpoints = 3
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_0000004.png", "step_0000008.png"]
    assert "done: 8 steps (to step 8)" in out.stdout


def test_sigterm_then_resume_is_bitwise_identical(reference_run, tmp_path):
    workdir, _ = reference_run
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", *TINY, "--workdir", str(resumed),
           "--config.total_steps=8", "--config.checkpoint_every=2", "--config.sample_every=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not os.path.isdir(resumed / "checkpoints" / "2") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(int(os.path.basename(p)) for p in glob.glob(str(resumed / "checkpoints" / "[0-9]*")))
    if stopped < 8:
        assert "SIGTERM received" in err
    out = train(resumed, "--config.total_steps=8", "--config.checkpoint_every=2", "--config.sample_every=4")
    assert out.returncode == 0, out.stderr[-3000:]
    if stopped < 8:
        assert f"resumed from step {stopped}" in out.stderr
    want, got = final_state(str(workdir), 8), final_state(str(resumed), 8)
    for name in ("student", "ema", "lora", "student_opt", "lora_opt", "rng", "step"):
        for a, b in zip(leaves(want[name]), leaves(got[name])):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_two_processes_match_one_process(tmp_path):
    """2 processes x 2 devices (jax.distributed over 127.0.0.1, gloo) give the 1 process x 4 devices result."""
    common = ["--config.total_steps=2", "--config.checkpoint_every=2", "--config.batch_size=4"]
    single = train(tmp_path / "single", *common, devices=4)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", str(tmp_path / "multi"),
                            *TINY[2:], *common, "--config.sample_every=2"], cwd=ROOT, env={**env(), "PYTHON": sys.executable},
                           capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert os.path.exists(tmp_path / "multi" / "samples" / "step_0000002.png")  # process 0 wrote the grid
    want, got = final_state(str(tmp_path / "single"), 2), final_state(str(tmp_path / "multi"), 2)
    for name in ("student", "ema", "lora"):
        for a, b in zip(leaves(want[name]), leaves(got[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("override,message", [
    ("--config.no_such_key=1", "error: unknown config key 'no_such_key' in --config.no_such_key=1"),
    ("--config.prompts=/no/such/prompts.txt", "error: /no/such/prompts.txt: no such prompt file"),
    ("--config.batch_size=3", "error: batch_size=3 is not divisible by the 2 devices"),
])
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    out = train(tmp_path / "w", override, devices=2, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
