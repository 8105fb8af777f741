"""The training program end to end: outputs, exact resume after SIGTERM, multi-process runs, bad input."""

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from swiftbrush_jax.files.checkpoint import read_on_one_device

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


REFERENCE = ["--config.total_steps=24", "--config.checkpoint_every=2", "--config.sample_every=8"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 24-step run with checkpoints every 2 steps and sample grids every 8."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = train(workdir, *REFERENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def checkpoint_steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))


def test_run_writes_checkpoints_events_and_samples(reference_run):
    workdir, out = reference_run
    assert checkpoint_steps(workdir) == [20, 22, 24]  # keep_checkpoints = 3
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [f"step_{s:07d}.png" for s in (8, 16, 24)]
    assert "done: 24 steps (to step 24)" in out.stdout


def test_a_finished_run_says_what_to_run_next_on_its_workdir(reference_run):
    """The last lines name the workdir in the commands that sample (the first validation prompt), evaluate
    (a shapes-prompt config: the shapes suite) and export it, each with flags those commands take."""
    workdir, out = reference_run
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines == [f"next: python -m swiftbrush_jax.sample --model {workdir} --prompt 'a red circle' "
                     f"--out {workdir}/samples_one_step",
                     f"      python -m swiftbrush_jax.evaluate --suite shapes --model {workdir}",
                     f"      python -m swiftbrush_jax.export --workdir {workdir} --out {workdir}/exported"], lines
    from swiftbrush_jax import evaluate, export, sample

    assert sample.parse_args(shlex.split(lines[0])[4:]).prompt == ["a red circle"]
    assert export.parse_args(shlex.split(lines[2])[3:]).workdir == str(workdir)
    assert evaluate.parse_args(shlex.split(lines[1])[3:]).suite == "shapes"


def test_sample_grids_are_enlarged_for_viewing(reference_run):
    """The tiny teacher's 16 px images, nearest-neighbour to 128 px (sample_grid_min_px): 2 prompts wide, the
    student's row over the EMA's."""
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(reference_run[0], "samples", "step_0000024.png")))
    assert grid.shape == (2 * 128, 2 * 128, 3)
    raw = grid[::8, ::8]
    np.testing.assert_array_equal(grid, raw.repeat(8, axis=0).repeat(8, axis=1))  # 8 x 8 blocks: no new values
    assert len(np.unique(raw.reshape(-1, 3), axis=0)) > 16  # images, not a flat fill


def test_upscaled_is_nearest_by_the_smallest_whole_factor():
    from swiftbrush_jax.generate import upscaled

    images = np.random.default_rng(0).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    big = upscaled(images, 128)
    assert big.shape == (3, 128, 192, 3)  # 16 px -> 128: 8x, both sides
    np.testing.assert_array_equal(big[:, ::8, ::8], images)
    np.testing.assert_array_equal(upscaled(images, 130)[:, ::9, ::9], images)  # rounds the factor up
    for min_px in (0, 16, 10):  # 0: raw size; already large enough: unchanged
        assert upscaled(images, min_px) is images


def test_a_workdir_from_before_the_grid_flag_resumes():
    """sample_grid_min_px only changes how grids are viewed: a checkpoint without it, or with another value, resumes."""
    from swiftbrush_jax.config_base import load_config_file
    from swiftbrush_jax.files import checkpoint as ckpt

    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    saved = ckpt.config_record(config)
    del saved["sample_grid_min_px"]
    assert ckpt.config_changes(saved, config) == (["sample_grid_min_px: '<absent>' -> 128"], [])
    saved = ckpt.config_record(config)
    config.sample_grid_min_px = 0
    assert ckpt.config_changes(saved, config) == (["sample_grid_min_px: 128 -> 0"], [])


def test_sigterm_then_resume_is_bitwise_identical(reference_run, tmp_path):
    """SIGTERM in the loop saves and exits; the resumed run ends bitwise where the uninterrupted one did.

    The interrupted run is asked for 1000 steps, so the signal certainly lands before its end; the resumed
    run changes total_steps back to 24, which a resumed run may do."""
    workdir, _ = reference_run
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", *TINY, "--workdir", str(resumed),
           "--config.total_steps=1000", "--config.checkpoint_every=2", "--config.sample_every=8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not os.path.isdir(resumed / "checkpoints" / "2") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stopped = checkpoint_steps(resumed)[-1]
    assert "SIGTERM received" in err and f"saved step {stopped}" in err
    assert 2 <= stopped < 24, stopped
    out = train(resumed, *REFERENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {stopped}" in out.stderr
    assert "changed settings: total_steps: 1000 -> 24" in out.stderr
    want, got = final_state(str(workdir), 24), final_state(str(resumed), 24)
    for name in ("student", "ema", "lora", "student_opt", "lora_opt", "rng", "step"):
        for a, b in zip(leaves(want[name]), leaves(got[name])):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("override,key", [("--config.lora.rank=8", "lora.rank: 4 -> 8"),
                                          ("--config.batch_size=8", "batch_size: 4 -> 8"),
                                          ("--config.vsd.guidance_scale=2.0", "vsd.guidance_scale: 4.5 -> 2.0")])
def test_a_changed_config_is_refused_not_moved(reference_run, tmp_path, override, key):
    """A resume that changes what the state holds or how it is made is one error line naming the key;
    the checkpoints stay where they are (they are not damaged)."""
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], workdir)
    out = train(workdir, *REFERENCE, "--config.total_steps=30", override, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint 24 in ") and key in last and "cannot change mid-run" in last, last
    assert "total_steps" not in last.split("cannot change mid-run")[1].split(";")[0]  # allowed, not refused
    assert checkpoint_steps(workdir) == [20, 22, 24] and not (workdir / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_loop_ends_the_run_at_once(tmp_path, sig):
    """Before the first step (teacher loading, compilation) SIGINT/SIGTERM end the process at once by the
    signal's default action (status 130/143 in a shell), and nothing is written."""
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", *TINY, "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the prompt source is read right after the handlers are set
        seen.append(line)
        if line.startswith("prompts:"):
            break
    assert seen and seen[-1].startswith("prompts:"), "".join(seen)[-3000:]
    time.sleep(1.0)  # into the teacher loading or the compilation
    sent = time.time()
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == -sig, proc.returncode
    assert time.time() - sent < 10  # the compilation alone takes longer
    assert checkpoint_steps(workdir) == []


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
