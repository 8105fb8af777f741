"""The shipped shapes teacher: loads like SD 2.1, samples the right colours, and can be distilled."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from swiftbrush_jax.evaluators import shapes_suite
from swiftbrush_jax.files.pipeline import load_pipeline
from swiftbrush_jax.toy import teacher_arch, teacher_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DDIM 25 steps, CFG 3, all 28 prompts x 4 seeds per combination: colour 0.986, shape 0.972 (docs/shapes.md). The
# test's 12 images (first 6 prompts x 2 seeds) must keep well above chance (1/6, 1/3).
MIN_TEACHER_COLOR_ACCURACY = 0.9
MIN_TEACHER_SHAPE_ACCURACY = 0.75
# The shipped CLIP on 1024 held-out renders: zero-shot accuracy over the 18 specified prompts (docs/shapes.md).
MIN_CLIP_ZERO_SHOT = 0.9


@pytest.fixture(scope="module")
def teacher():
    return load_pipeline(teacher_path())


def test_teacher_loads_like_stable_diffusion(teacher):
    assert teacher.unet.config.sample_size == teacher_arch.LATENT_PX
    assert teacher.schedule.prediction_type == "epsilon"
    assert 0.1 < teacher.vae.config.scaling_factor < 10.0
    cond = np.asarray(teacher.encode_text(["a red circle", "a blue square"]))
    assert cond.shape == (2, teacher_arch.MAX_TOKENS, teacher_arch.TEXT["hidden_size"])
    assert np.abs(cond[0] - cond[1]).max() > 1e-3  # the captions are told apart


def test_make_teacher_writes_the_shipped_tokenizer(tmp_path):
    """make_teacher's tokenizer is the one the shipped text encoder was trained with, file for file."""
    from swiftbrush_jax.toy import make_teacher

    make_teacher.write_tokenizer(str(tmp_path))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        with open(tmp_path / "tokenizer" / name) as made, open(os.path.join(teacher_path(), "tokenizer", name)) as shipped:
            assert json.load(made) == json.load(shipped) if name.endswith(".json") else made.read() == shipped.read()


def test_make_teacher_writes_the_shipped_architecture(tmp_path):
    """Every component config make_teacher writes is the shipped one (the VAE's scaling factor is measured on
    the encoded data, so it alone is left out)."""
    from swiftbrush_jax.models.unet import unet_config_to_diffusers
    from swiftbrush_jax.toy import make_teacher

    def shipped(*path):
        with open(os.path.join(teacher_path(), *path)) as f:
            return json.load(f)

    as_json = lambda config: json.loads(json.dumps(config))
    _, vocab_size = make_teacher.write_tokenizer(str(tmp_path))
    vae = shipped("vae", "config.json")
    assert 0.1 < vae.pop("scaling_factor") < 10.0
    made_vae = as_json(make_teacher.vae_config().to_diffusers())
    made_vae.pop("scaling_factor")
    assert made_vae == vae
    assert as_json(unet_config_to_diffusers(make_teacher.unet_config())) == shipped("unet", "config.json")
    assert as_json(make_teacher.text_config(vocab_size).to_transformers()) == shipped("text_encoder", "config.json")
    assert shipped("scheduler", "scheduler_config.json") == teacher_arch.SCHEDULER
    assert as_json(make_teacher.clip_config(vocab_size)) == shipped(make_teacher.CLIP_FOLDER, "config.json")


def test_clip_targets_count_an_open_caption_for_every_image_it_describes():
    """Images: red circle, blue circle, red square; their drawn captions: "a red circle", "a circle",
    "a red shape". The red circle is described by all three, the others by one each."""
    from swiftbrush_jax.toy import shapes
    from swiftbrush_jax.toy.teacher_training import caption_rows, clip_targets

    prompts = shapes.all_prompts()
    attributes = {"color": np.array([shapes.COLOR_NAMES.index(c) for c in ("red", "blue", "red")]),
                  "shape": np.array([shapes.SHAPES.index(s) for s in ("circle", "circle", "square")])}
    captions = np.array([prompts.index(p) for p in ("a red circle", "a circle", "a red shape")])
    targets = np.asarray(clip_targets(caption_rows(attributes, prompts), captions))
    np.testing.assert_allclose(targets, [[1 / 3, 1 / 3, 1 / 3], [0, 1, 0], [0, 0, 1]], rtol=1e-6)


def test_shipped_clip_matches_transformers_and_tells_the_prompts_apart():
    """The world's CLIP (make_teacher's stage 3) loads in transformers with our features, and on held-out
    renders names each image's own colour and shape before every other of the 18 specified prompts."""
    import torch
    from transformers import CLIPModel as TorchCLIPModel

    from swiftbrush_jax.models.clip import load_clip_model
    from swiftbrush_jax.toy import make_teacher

    folder = os.path.join(teacher_path(), make_teacher.CLIP_FOLDER)
    model, params = load_clip_model(folder)
    token_ids, _ = make_teacher.write_tokenizer(tempfile.mkdtemp())
    pixels = np.random.RandomState(0).randn(2, teacher_arch.IMAGE_PX, teacher_arch.IMAGE_PX, 3).astype(np.float32)
    ids = np.asarray(token_ids[:2], np.int64)
    theirs = TorchCLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image = theirs.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        text = theirs.get_text_features(input_ids=torch.from_numpy(ids))
    as_numpy = lambda x: getattr(x, "pooler_output", x).numpy()
    np.testing.assert_allclose(model.apply({"params": params}, pixels, method="image_features"), as_numpy(image),
                               atol=1e-4)
    np.testing.assert_allclose(model.apply({"params": params}, ids.astype(np.int32), method="text_features"),
                               as_numpy(text), atol=1e-4)
    scores = make_teacher.clip_zero_shot(model, params, token_ids, n=256)
    assert scores["zero_shot_accuracy"] >= MIN_CLIP_ZERO_SHOT, scores


def test_teacher_ddim_draws_the_prompted_colour_and_shape():
    result = shapes_suite.evaluate(teacher_path(), steps=25, guidance=3.0, num_prompts=6, seeds=2)
    assert result["images"].shape == (12, teacher_arch.IMAGE_PX, teacher_arch.IMAGE_PX, 3)
    assert result["color_accuracy"] >= MIN_TEACHER_COLOR_ACCURACY, result
    assert result["shape_accuracy"] >= MIN_TEACHER_SHAPE_ACCURACY, result


@pytest.mark.parametrize("student", ["v1", "v2_b"])
def test_short_distillation_trains_the_student(tmp_path, teacher, student):
    """Two steps of configs/shapes.py: the checkpoint holds a student moved away from the teacher, an EMA
    between them, a record that runs it, and its one-step samples differ from the teacher's. configs/shapes.py:v2_b
    is SwiftBrush v2's student B: adapters over the teacher (recorded as such and merged to sample) trained
    with the clamped CLIP loss too (the world's shipped CLIP, the teacher's VAE as decoder), in 2 microbatches."""
    import jax
    from flax import traverse_util

    from swiftbrush_jax import sample
    from swiftbrush_jax.files.checkpoint import read_on_one_device
    from swiftbrush_jax.files.student import load_trained_student

    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", "--config", os.path.join(REPO, "configs", f"shapes.py:{student}"),
           "--workdir", str(workdir), "--config.total_steps=2", "--config.batch_size=2",
           "--config.sample_every=0", "--config.checkpoint_every=2", "--config.log_every=1"]
    lora_student = student == "v2_b"
    if lora_student:  # the CLIP loss in microbatches, through the trainer
        cmd.append("--config.microbatches=2")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("loss_clip=" in run.stderr) == lora_student, run.stderr[-3000:]
    state, meta = read_on_one_device(str(workdir / "checkpoints"), 2)
    assert int(state["step"]) == 2 and int(state["skipped"]) == 0
    lora = None
    if lora_student:
        lora = {"rank": 32, "alpha": 64.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
        names = {path[-1] for path in traverse_util.flatten_dict(state["student"])}
        assert names == {"down", "up"}  # adapters only: no copy of the UNet in the state
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
    student_tree = load_trained_student(str(workdir), ema=False).params
    ema_tree = load_trained_student(str(workdir)).params
    teacher_w, student_w, ema_w = (leaves(t) for t in (teacher.unet_params, student_tree, ema_tree))
    moved = sum(float(np.abs(s - t).sum()) for s, t in zip(student_w, teacher_w))
    assert moved > 0
    # The EMA after two updates (decays 1/10, then 2/11; docs/method.md §3) lies between teacher and student.
    ema_moved = sum(float(np.abs(e - t).sum()) for e, t in zip(ema_w, teacher_w))
    assert 0 < ema_moved < moved
    assert meta["student"] == {"teacher": {"package": os.path.join("toy", "teacher")}, "t": 999,
                               "output_is_x0": False, "prediction_type": "epsilon",
                               "latent_size": teacher_arch.LATENT_PX, "lora": lora}
    assert meta["config"]["batch_size"] == 2 and meta["config"]["vsd.lora_guidance_scale"] == 1.0
    noise = sample.seeded_noise([0], (teacher_arch.LATENT_PX, teacher_arch.LATENT_PX, 4))
    student_images = sample.BatchedSampler(sample.load_sampling_model(str(workdir), ema=False), 1)(["a red circle"], noise)
    teacher_images = sample.BatchedSampler(sample.load_sampling_model(teacher_path()), 1)(["a red circle"], noise)
    assert student_images.shape == teacher_images.shape and np.isfinite(student_images).all()
    assert np.abs(student_images - teacher_images).max() > 1 / 255
