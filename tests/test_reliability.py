"""Faults and bad input lose nothing: real training processes of the tiny config, SIGKILLed at five
moments, resumed over damaged checkpoints, fed a NaN teacher, run out of disk, and given bad inputs.

The module is compile-bound, so its processes run on three lanes at once (``scenarios``) and share
the persistent compilation cache of tests/conftest.py. Run with ``-s`` to see each kill point's record.
"""

import concurrent.futures
import contextlib
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/tiny.py", "--config.sample_every=0", "--config.log_every=2",
        "--config.checkpoint_every=2"]
STEPS = 8  # the reference run keeps checkpoints 4, 6 and 8 (keep_checkpoints=3)
TIMEOUT = 900


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def env(devices: int = 1) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"}


def launch(workdir, overrides, devices: int = 1, extra_env: Optional[dict] = None):
    """A training process writing its output to anonymous files outside the workdir (a full pipe would
    stall it; a full workdir disk must not)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", *TINY, "--workdir", str(workdir), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(devices), **(extra_env or {})}, stdout=out, stderr=err)
    return proc, out, err


def written(f) -> str:
    """What the child wrote so far. pread leaves the file offset alone: the child's stderr shares it, so a
    seek here would make the child's next write land over what it wrote before."""
    chunks, offset = [], 0
    while chunk := os.pread(f.fileno(), 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")


def collect(proc, out, err) -> Run:
    proc.wait(timeout=TIMEOUT)
    texts = [written(out), written(err)]
    out.close()
    err.close()
    return Run(proc.returncode, *texts)


def train(workdir, *overrides, devices: int = 1, extra_env: Optional[dict] = None) -> Run:
    return collect(*launch(workdir, overrides, devices, extra_env))


def kill_when(workdir, condition: Callable[[str, str, float], bool], *overrides) -> tuple:
    """Run until ``condition(workdir, stderr so far, seconds since launch)`` holds, then SIGKILL.
    Returns the run, whether it was killed (not finished first) and when."""
    proc, out, err = launch(workdir, overrides)
    start = time.time()
    killed = False
    while proc.poll() is None and time.time() - start < TIMEOUT:
        if condition(str(workdir), written(err), time.time() - start):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    seconds = time.time() - start
    return collect(proc, out, err), killed, seconds


def steps_on_disk(workdir) -> tuple:
    """(complete checkpoint steps, unfinished ``*.orbax-checkpoint-tmp*`` folders) under workdir/checkpoints."""
    names = os.listdir(os.path.join(workdir, "checkpoints")) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def resumed_from(stderr: str) -> Optional[int]:
    lines = [line for line in stderr.splitlines() if line.startswith("resumed from step ")]
    return int(lines[-1].split()[-1]) if lines else None


def state_at(workdir, step: int):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


def differing_arrays(a, b) -> list:
    """Names of the leaves of two restored states that are not bitwise equal."""
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    return [jax.tree_util.keystr(path) for (path, x), y in zip(flat_a, flat_b)
            if not np.array_equal(np.asarray(x), np.asarray(y))]


def data_files(workdir, step: int) -> list:
    return glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)


def flip_one_bit(workdir, step: int) -> None:
    """Flip the lowest bit of one stored value of the EMA's conv_in kernel. The arrays are zstd-compressed, so
    this goes through tensorstore: the checkpoint stays perfectly readable, and only the checksums can tell."""
    import tensorstore as ts

    state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{state_dir}/",
                                                   "path": "ema.conv_in.kernel/"}}).result()
    values = array.read().result()
    values.reshape(-1).view(np.uint32)[0] ^= 1
    array.write(values).result()


def truncate_half(workdir, step: int) -> None:
    """Cut the checkpoint's largest data file in half, as a crash or a full disk mid-copy would."""
    path = max(data_files(workdir, step), key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the duration; skips where mounting is not permitted (needs root)."""
    os.makedirs(path, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up: {mount.stderr.strip() or 'mount failed'} (needs root)")
    try:
        yield str(path)
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)])  # still busy: detach now, freed when released


def fill(disk, leave: int) -> str:
    """A file taking all of the disk's free space but ``leave`` bytes; returns its path."""
    stat = os.statvfs(disk)
    path = os.path.join(disk, "filler")
    with open(path, "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
    return path


def fs_tmp_of(step: int):
    return lambda workdir, _err, _t: bool(glob.glob(os.path.join(workdir, "checkpoints", f"{step}.orbax-checkpoint-tmp*")))


def fs_committed(step: int):
    return lambda workdir, _err, _t: os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


# ----------------------------------------------------------------------------------------------------------
# Scenarios: each returns plain data for the tests below to check.


def kill_chain(workdir) -> dict:
    """Train to STEPS through five SIGKILLs; before the last two restarts the newest checkpoint is damaged
    (a bit flipped, then a file truncated). Every restart must resume from the newest intact checkpoint."""
    delay = random.Random(8).uniform(0.5, 4.0)
    points = [
        (f"at a random moment, {delay:.2f} s after launch", lambda _w, _e, t: t >= delay, None),
        ("right after checkpoints/2.orbax-checkpoint-tmp appeared (async write of step 2 under way)", fs_tmp_of(2), None),
        ("right after checkpoint 4 was committed (its final folder appeared)", fs_committed(4), None),
        ("during compilation, right after the restart printed 'resumed from step'",
         lambda _w, err, _t: "resumed from step" in err, None),
        ("right after checkpoints/6.orbax-checkpoint-tmp appeared, in a run that began by finding "
         "one bit of its newest checkpoint flipped", fs_tmp_of(6), flip_one_bit),
    ]
    records, runs = [], []
    for description, condition, damage in points:
        record = {"kill_point": description, **restart_expectation(workdir, damage)}
        run, killed, seconds = kill_when(workdir, condition, f"--config.total_steps={STEPS}")
        complete, partial = steps_on_disk(workdir)
        record.update(killed=killed, seconds=round(seconds, 1), complete_at_kill=complete,
                      partial_at_kill=partial, resumed_from=resumed_from(run.stderr))
        records.append(record)
        runs.append(run)
    final_record = restart_expectation(workdir, truncate_half)
    final = train(workdir, f"--config.total_steps={STEPS}")
    final_record.update(resumed_from=resumed_from(final.stderr))
    return {"workdir": workdir, "records": records, "runs": runs, "final": final, "final_record": final_record,
            "on_disk": steps_on_disk(workdir), "corrupt": sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints")))}


def restart_expectation(workdir, damage) -> dict:
    """Apply ``damage`` to the newest complete checkpoint (if any) and say where the next run must resume."""
    complete, _ = steps_on_disk(workdir)
    damaged = None
    if damage is not None:
        damaged = complete.pop()
        damage(workdir, damaged)
    return {"damaged": damaged, "damage": getattr(damage, "__name__", None),
            "expect_resume": complete[-1] if complete else None}


def non_finite_run(reference, workdir) -> dict:
    """Resume a copy of the reference run (checkpoints 4, 6, 8) with one NaN in the teacher UNet."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(reference, workdir)
    path = os.path.join(workdir, "tiny_teacher", "unet", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    poisoned = tensors["conv_in.weight"].copy()
    poisoned[0, 0, 0, 0] = np.nan
    save_file({**tensors, "conv_in.weight": poisoned}, path, metadata={"format": "pt"})
    before = steps_on_disk(workdir)
    run = train(workdir, "--config.total_steps=12", "--config.max_consecutive_skips=3")
    return {"run": run, "before": before, "after": steps_on_disk(workdir),
            "changed": differing_arrays(state_at(reference, STEPS), state_at(workdir, STEPS))}


def full_disk_runs(reference, mount_point) -> dict:
    """On a tmpfs just big enough, resume a copy of the reference run with the disk filled so checkpoint 10
    cannot be written; then free the space and resume again."""
    needed = sum(os.path.getsize(f) for f in glob.glob(os.path.join(reference, "**"), recursive=True)
                 if os.path.isfile(f))
    with tmpfs(mount_point, f"{needed // 1024 + 32 * 1024}k") as disk:
        workdir = os.path.join(disk, "w")
        shutil.copytree(reference, workdir)
        filler = fill(disk, leave=2 * 2**20)  # a checkpoint of the tiny config takes ~13 MiB
        failed = train(workdir, "--config.total_steps=10")
        after_failure = steps_on_disk(workdir)
        changed = differing_arrays(state_at(reference, STEPS), state_at(workdir, STEPS))
        os.remove(filler)
        resumed = train(workdir, "--config.total_steps=10")
        return {"failed": failed, "after_failure": after_failure, "changed": changed,
                "resumed": resumed, "after_resume": steps_on_disk(workdir)}


def bad_input_cases(base, reference_future) -> dict:
    """Each bad input run once; the teacher and workdir cases wait for the reference run."""
    os.makedirs(base, exist_ok=True)
    def prompt_file(name: str, data: bytes) -> str:
        path = os.path.join(base, name)
        with open(path, "wb") as f:
            f.write(data)
        return f"--config.prompts={path}"

    def teacher_copy(name: str, edit: Callable[[str], None]) -> list:
        root = os.path.join(base, name)
        shutil.copytree(os.path.join(reference_future.result(), "tiny_teacher"), root)
        edit(root)
        return [f"--config.teacher={root}", "--config.make_tiny_teacher=False"]

    def edit_unet_config(**changes):
        def edit(root):
            path = os.path.join(root, "unet", "config.json")
            with open(path) as f:
                config = json.load(f)
            with open(path, "w") as f:
                json.dump({**config, **changes}, f)
        return edit

    def incompatible_workdir() -> str:
        shutil.copytree(reference_future.result(), os.path.join(base, "rank4_workdir"))
        return os.path.join(base, "rank4_workdir")

    early = {
        "empty prompt file": (lambda: [prompt_file("empty.txt", b"")], 1),
        "UTF-16 prompt file": (lambda: [prompt_file("utf16.txt", "a red circle\na blue square\n".encode("utf-16"))], 1),
        "latin-1 prompt file": (lambda: [prompt_file("latin1.txt", "café crème\nnaïve art\n".encode("latin-1"))], 1),
        "batch not divisible by the devices": (lambda: ["--config.batch_size=6"], 4),
        "unknown nested config key": (lambda: ["--config.lora.no_such_key=1"], 1),
    }
    late = {
        "teacher missing a component": (lambda: teacher_copy("no_vae", lambda r: shutil.rmtree(os.path.join(r, "vae"))), 1),
        "SD 1.x-shaped config over SD 2.x weights": (
            lambda: teacher_copy("sd1", edit_unet_config(use_linear_projection=False)), 1),
        "SDXL-style UNet config": (
            lambda: teacher_copy("sdxl", edit_unet_config(addition_embed_type="text_time", addition_time_embed_dim=256,
                                                          projection_class_embeddings_input_dim=2816)), 1),
        "pickle-only UNet weights": (lambda: teacher_copy("pickle", lambda r: os.rename(
            os.path.join(r, "unet", "diffusion_pytorch_model.safetensors"),
            os.path.join(r, "unet", "diffusion_pytorch_model.bin"))), 1),
    }

    def run_case(name, make_overrides, devices):
        workdir = os.path.join(base, "runs", name.replace(" ", "_"))
        return train(workdir, *make_overrides(), devices=devices, extra_env={"JAX_LOG_COMPILES": "1"})

    def run_incompatible():
        workdir = incompatible_workdir()
        before = steps_on_disk(workdir)
        run = train(workdir, "--config.lora.rank=8", extra_env={"JAX_LOG_COMPILES": "1"})
        return run, before, steps_on_disk(workdir)

    out = {name: run_case(name, *case) for name, case in {**early, **late}.items()}
    run, before, after = run_incompatible()
    out["workdir of an incompatible config (LoRA rank 8 vs 4)"] = run
    out["_incompatible_workdir_listing"] = (before, after)
    return out


BAD_INPUTS = {
    "empty prompt file": "holds no prompts",
    "UTF-16 prompt file": "the source is not UTF-8 text",
    "latin-1 prompt file": "the source is not UTF-8 text",
    "batch not divisible by the devices": "batch_size=6 is not divisible by the 4 devices",
    "unknown nested config key": "unknown config key",
    "teacher missing a component": "has no vae/ folder",
    "SD 1.x-shaped config over SD 2.x weights": "unet weights do not match its config.json",
    "SDXL-style UNet config": "is an SDXL pipeline (unet/config.json has addition_embed_type='text_time') but has "
                              "no text_encoder_2/ folder",
    "pickle-only UNet weights": "is a pickle checkpoint, which is never loaded",
    "workdir of an incompatible config (LoRA rank 8 vs 4)":
        "was made with another config, and these keys cannot change mid-run: lora.rank: 4 -> 8;",
}


def lane(pool, jobs) -> dict:
    """Run ``(name, fn)`` jobs one after another on one pool thread; each result (or error) in its own future."""
    futures = {name: concurrent.futures.Future() for name, _ in jobs}

    def run_all():
        for name, fn in jobs:
            try:
                futures[name].set_result(fn())
            except BaseException as e:  # handed to the test that waits on this future
                futures[name].set_exception(e)

    pool.submit(run_all)
    return futures


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Every scenario, on three lanes at once: (1) the kill chain; (2) the uninterrupted reference, then the
    NaN and full-disk runs on copies of it; (3) the bad inputs. Each test waits on the futures it needs."""
    base = tmp_path_factory.mktemp("reliability")
    start, cpu_start = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    pool = concurrent.futures.ThreadPoolExecutor(3)

    def reference():
        run = train(base / "reference", f"--config.total_steps={STEPS}")
        assert run.returncode == 0, run.stderr[-3000:]
        return str(base / "reference")

    futures = lane(pool, [("chain", lambda: kill_chain(str(base / "chain")))])
    futures.update(lane(pool, [
        ("reference", reference),
        ("non_finite", lambda: non_finite_run(futures["reference"].result(), str(base / "non_finite"))),
        ("full_disk", lambda: full_disk_runs(futures["reference"].result(), str(base / "tmpfs"))),
    ]))
    futures.update(lane(pool, [("bad_inputs", lambda: bad_input_cases(str(base / "bad"), futures["reference"]))]))
    yield futures
    pool.shutdown(wait=True)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\nreliability scenarios: {time.time() - start:.0f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime:.0f} s CPU in training processes")


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_sigkill_at_any_moment_resumes_from_newest_complete_checkpoint_bitwise(scenarios):
    chain = scenarios["chain"].result()
    for i, (record, run) in enumerate(zip(chain["records"], chain["runs"]), 1):
        print(f"kill point {i}: {record['kill_point']}: killed={record['killed']} after {record['seconds']} s; "
              f"on disk then: complete {record['complete_at_kill']}, unfinished {record['partial_at_kill']}; "
              f"this run resumed from {record['resumed_from']} (expected {record['expect_resume']}"
              + (f", checkpoint {record['damaged']} damaged by {record['damage']}" if record["damaged"] else "") + ")")
        assert record["killed"], f"kill point {i} never came: {run.stderr[-2000:]}"
        if i > 1:  # the first kill may land before the restore
            assert record["resumed_from"] == record["expect_resume"], run.stderr[-2000:]
    mid_write = [r for r in chain["records"] if r["partial_at_kill"]]
    assert mid_write, "no kill landed while a checkpoint was being written"
    final, record = chain["final"], chain["final_record"]
    print(f"final run: resumed from {record['resumed_from']} (expected {record['expect_resume']}, checkpoint "
          f"{record['damaged']} damaged by {record['damage']}); exit {final.returncode}")
    assert final.returncode == 0, final.stderr[-3000:]
    assert record["resumed_from"] == record["expect_resume"]
    complete, partial = chain["on_disk"]
    assert complete == [4, 6, 8] and partial == []
    assert differing_arrays(state_at(scenarios["reference"].result(), STEPS), state_at(chain["workdir"], STEPS)) == []


def test_damaged_checkpoint_is_reported_moved_aside_and_the_previous_one_used(scenarios):
    chain = scenarios["chain"].result()
    damaged_runs = [(r, run) for r, run in zip(chain["records"] + [chain["final_record"]], chain["runs"] + [chain["final"]])
                    if r["damaged"] is not None]
    assert [r["damage"] for r, _ in damaged_runs] == ["flip_one_bit", "truncate_half"]
    for record, run in damaged_runs:
        warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: checkpoint")]
        print(f"{record['damage']} of checkpoint {record['damaged']}: {warnings}")
        assert len(warnings) == 1, run.stderr[-3000:]
        assert warnings[0].startswith(f"warning: checkpoint {record['damaged']} is damaged (")
        assert "corrupt_checkpoints" in warnings[0]
    assert "differ from their saved checksums" in damaged_runs[0][1].stderr  # readable: only checksums tell
    # Both damaged copies of step 4 are kept, side by side; neither was deleted.
    steps = [r["damaged"] for r, _ in damaged_runs]
    names = [str(steps[0]), f"{steps[1]}.1" if steps[1] == steps[0] else str(steps[1])]
    assert chain["corrupt"] == sorted(names)
    for name in names:
        assert glob.glob(os.path.join(chain["workdir"], "corrupt_checkpoints", name, "state", "**", "d", "*"),
                         recursive=True)


def test_non_finite_updates_stop_the_run_and_keep_its_last_good_checkpoint(scenarios):
    result = scenarios["non_finite"].result()
    run = result["run"]
    print(f"NaN teacher: exit {run.returncode}; {last_line(run.stderr)}")
    assert "resumed from step 8" in run.stderr
    assert run.returncode == 2
    assert last_line(run.stderr).startswith("error: 3 consecutive updates had a non-finite loss or gradient "
                                             "(up to step 11); stopped without saving; the last good checkpoint "
                                             "is step 8")
    assert "Traceback" not in run.stderr
    assert result["after"] == result["before"] == ([4, 6, 8], [])  # step 10's save waited out the streak
    assert result["changed"] == []


def test_full_disk_fails_cleanly_and_a_later_resume_continues(scenarios):
    result = scenarios["full_disk"].result()
    failed, resumed = result["failed"], result["resumed"]
    print(f"full disk: exit {failed.returncode}; {last_line(failed.stderr)}")
    assert failed.returncode == 2
    assert last_line(failed.stderr).startswith("error: could not write checkpoint 10 to ")
    assert "MiB are free); the checkpoints already there are intact (newest: step 8)" in last_line(failed.stderr)
    assert [line for line in failed.stderr.splitlines() if line.startswith("error:")] == [last_line(failed.stderr)]
    assert "Traceback" not in failed.stderr
    assert result["after_failure"][0] == [4, 6, 8] and result["changed"] == []
    print(f"after freeing space: exit {resumed.returncode}; resumed from {resumed_from(resumed.stderr)}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed.stderr) == 8
    assert result["after_resume"] == ([6, 8, 10], [])  # the unfinished write of step 10 was cleaned up


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_before_compiling(scenarios, case):
    run = scenarios["bad_inputs"].result()[case]
    line = last_line(run.stderr)
    print(f"{case}: exit {run.returncode}; {line}")
    assert run.returncode == 2, run.stderr[-3000:]
    assert line.startswith("error: ") and BAD_INPUTS[case] in line, run.stderr[-3000:]
    assert [l for l in run.stderr.splitlines() if l.startswith("error:")] == [line]
    assert "Traceback" not in run.stderr
    for compiled in ("Compiling jit(train_step)", "Compiling jit(<lambda>)", "first step done"):
        assert compiled not in run.stderr  # neither the step nor the state/text-encoder programs
    if case.startswith("workdir of an incompatible config"):
        before, after = scenarios["bad_inputs"].result()["_incompatible_workdir_listing"]
        assert before == after == ([4, 6, 8], [])


def test_a_write_failing_midway_keeps_the_previous_checkpoint_even_with_keep_1(tmp_path):
    """What ensure_space cannot foresee (another writer, a quota): the disk fills during orbax's write.
    With max_to_keep=1 the old checkpoint is due for deletion, but only once a newer one is committed."""
    from swiftbrush_jax.files import checkpoint as ckpt

    state = {"w": jnp.arange(2**19, dtype=jnp.float32), "step": jnp.int32(1)}  # 2 MiB
    with tmpfs(tmp_path / "disk", "8m") as disk:
        mngr = ckpt.manager(disk, keep=1)
        ckpt.save(mngr, 1, state, {})
        ckpt.finish(mngr)
        filler = fill(disk, leave=2**19)
        with pytest.raises(ckpt.CheckpointWriteError, match=r"\(No space left on device\); the checkpoints "
                                                            r"already there are intact \(newest: step 1\)"):
            ckpt.save(mngr, 2, {**state, "w": state["w"] + 1}, {})
            ckpt.finish(mngr)
        assert steps_on_disk(disk)[0] == [1]
        assert differing_arrays(jax.device_get(state), state_at(disk, 1)) == []
        os.remove(filler)
        mngr = ckpt.manager(disk, keep=1)  # as a restarted run: the unfinished write is cleared away
        ckpt.save(mngr, 2, {**state, "w": state["w"] + 1}, {})
        ckpt.finish(mngr)
        assert steps_on_disk(disk) == ([2], [])


# ----------------------------------------------------------------------------------------------------------
# A pod of 2 processes x 2 CPU devices (jax.distributed over 127.0.0.1, gloo): a lost process, preemption.

POD_STEPS = 16
PEER_TIMEOUT_S = 10
POD_EXIT_BOUND_S = PEER_TIMEOUT_S + 30  # the watchdog's limit, plus its polling and a loaded machine's slack


def launch_pod(workdir, *overrides) -> list:
    """Both processes of a 2-process run; returns [(proc, out, err)] indexed by process id."""
    port = str(random.Random().randrange(20000, 40000))
    return [launch(workdir, [f"--config.peer_timeout_s={PEER_TIMEOUT_S}", "--config.batch_size=4",
                             "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                             "--process_id", str(i), *overrides], devices=2) for i in range(2)]


def pod_kill_when(workdir, condition: Callable[[str], bool]) -> dict:
    """Run the pod until ``condition(workdir)``, SIGKILL process 1 and time process 0's exit."""
    pod = launch_pod(workdir, "--config.total_steps=1000")
    start = time.time()
    while pod[0][0].poll() is None and time.time() - start < TIMEOUT and not condition(str(workdir)):
        time.sleep(0.01)
    on_disk = steps_on_disk(workdir)
    pod[1][0].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = collect(*pod[0])
    return {"survivor": survivor, "exit_s": time.time() - killed, "on_disk_at_kill": on_disk,
            "killed": collect(*pod[1])}


def pod_state(workdir, step: int):
    """A 2-process run's checkpoint, read here on one device (its 4-device layout does not exist here)."""
    from swiftbrush_jax.files.checkpoint import read_on_one_device

    return read_on_one_device(os.path.join(workdir, "checkpoints"), step)[0]


def newer_than(workdir, step) -> bool:
    return bool(steps_on_disk(workdir)[0]) and steps_on_disk(workdir)[0][-1] > step


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """An uninterrupted 2-process run; then, on another workdir: process 1 SIGKILLed after checkpoint 4
    (during training), SIGKILLed again while a later checkpoint is being written, then both processes
    SIGTERMed, and a last restart to POD_STEPS."""
    base = tmp_path_factory.mktemp("pod")
    # The uninterrupted run goes beside the chain: both are mostly start-up, waits and checkpoint writes.
    reference_pod = launch_pod(base / "reference", f"--config.total_steps={POD_STEPS}")
    workdir = base / "chain"
    training = pod_kill_when(workdir, lambda w: 4 in steps_on_disk(w)[0])
    after_first = steps_on_disk(workdir)[0][-1]
    mid_write = pod_kill_when(workdir, lambda w: any(int(n.split(".")[0]) > after_first for n in steps_on_disk(w)[1]))
    mid_write["resumed_from"] = resumed_from(mid_write["survivor"].stderr)
    before_term = steps_on_disk(workdir)[0][-1]
    procs = launch_pod(workdir, "--config.total_steps=1000")
    deadline = time.time() + TIMEOUT
    while procs[0][0].poll() is None and time.time() < deadline and not newer_than(workdir, before_term + 1):
        time.sleep(0.01)
    for proc, _, _ in procs:
        proc.send_signal(signal.SIGTERM)
    terminated = [collect(*p) for p in procs]
    after_term = steps_on_disk(workdir)
    final = [collect(*p) for p in launch_pod(workdir, f"--config.total_steps={POD_STEPS}")]
    reference = [collect(*p) for p in reference_pod]
    return {"reference": (reference, base / "reference"), "training": training, "mid_write": mid_write,
            "before_term": before_term, "terminated": terminated, "after_term": after_term, "final": final,
            "workdir": workdir}


def assert_lost_peer_reported(record):
    survivor = record["survivor"]
    print(f"process 1 SIGKILLed (on disk then: {record['on_disk_at_kill']}); process 0 exited "
          f"{record['exit_s']:.1f} s later with status {survivor.returncode}: {last_line(survivor.stderr)}")
    assert survivor.returncode == 3, survivor.stderr[-3000:]
    assert last_line(survivor.stderr).startswith("error: process 1 of 2 was lost"), survivor.stderr[-3000:]
    assert "Check failure" not in survivor.stderr and "Fatal Python error" not in survivor.stderr
    assert record["exit_s"] < POD_EXIT_BOUND_S


def test_a_lost_process_ends_the_others_in_bounded_time_with_one_line(pod):
    assert all(r.returncode == 0 for r in pod["reference"][0]), pod["reference"][0][0].stderr[-3000:]
    assert_lost_peer_reported(pod["training"])
    assert not pod["training"]["on_disk_at_kill"][1]  # killed between writes, not during one


def test_a_process_lost_during_a_checkpoint_write_leaves_no_half_checkpoint(pod):
    record = pod["mid_write"]
    assert record["on_disk_at_kill"][1], "the kill did not land during a checkpoint write"
    assert_lost_peer_reported(record)
    assert record["resumed_from"] == pod["training"]["on_disk_at_kill"][0][-1] or record["resumed_from"] >= 4


def test_sigterm_to_every_process_saves_one_checkpoint_and_exits_0(pod):
    terminated, (complete, partial) = pod["terminated"], pod["after_term"]
    assert [r.returncode for r in terminated] == [0, 0], terminated[0].stderr[-3000:] + terminated[1].stderr[-3000:]
    assert f"saved step {complete[-1]}, exiting" in terminated[0].stderr and partial == []
    assert complete[-1] > pod["before_term"]


def test_a_pod_restarted_after_losses_and_preemption_ends_bitwise_as_an_uninterrupted_one(pod):
    final = pod["final"]
    assert [r.returncode for r in final] == [0, 0], final[0].stderr[-3000:]
    assert resumed_from(final[0].stderr) == pod["after_term"][0][-1]
    assert steps_on_disk(pod["workdir"])[1] == []
    assert differing_arrays(pod_state(pod["reference"][1], POD_STEPS), pod_state(pod["workdir"], POD_STEPS)) == []


def test_sigterm_during_the_first_compilation_ends_the_process_at_once(tmp_path):
    """The signal lands after the progress bar appeared, inside the first compilation (the persistent cache
    is off, so the compile is real): the default action ends the process, nothing is written."""
    proc, out, err = launch(tmp_path / "w", ["--config.total_steps=1000"],
                            extra_env={"JAX_ENABLE_COMPILATION_CACHE": "false"})
    deadline = time.time() + TIMEOUT
    while "0/1000" not in written(err) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    assert "first step done" not in written(err), "the compilation ended before the signal; it proves nothing"
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    run = collect(proc, out, err)
    assert run.returncode == -signal.SIGTERM, run.stderr[-3000:]
    assert time.time() - sent < 10
    assert steps_on_disk(tmp_path / "w") == ([], [])
