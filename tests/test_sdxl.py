"""SDXL as a teacher, end to end on a tiny random SDXL pipeline that diffusers builds and saves
(tests/reference.py's save_sdxl_pipeline): prompt encoding and sampling against diffusers'
StableDiffusionXLPipeline, then two training steps and sampling the student (docs/sdxl.md)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import reference
from swiftbrush_jax import export, sample
from swiftbrush_jax.files.pipeline import load_pipeline
from swiftbrush_jax.models import presets
from swiftbrush_jax.schedule import NoiseSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a blue square"]
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory):
    torch.set_num_threads(1)  # two OpenMP threads crawl when the CPU is shared
    return reference.save_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "pipe"), presets.TINY_CORPUS)


@pytest.fixture(scope="module")
def latents():
    """Initial noise in diffusers' NCHW layout, at the UNet's sample_size (8: 16 px through the tiny VAE)."""
    return np.random.RandomState(0).randn(len(PROMPTS), 4, 8, 8).astype(np.float32)


def diffusers_sdxl(root, scheduler_config=None):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(root)
    config = scheduler_config or pipe.scheduler.config
    pipe.scheduler = DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_encoding_matches_diffusers(sdxl_root):
    """Context (both penultimate states joined), pooled text_embeds, zeros for the empty prompt
    (force_zeros_for_empty_prompt), and time ids (h, w, 0, 0, h, w) of the image size."""
    pipe = load_pipeline(sdxl_root, components=("text_encoder", "tokenizer", "vae"))
    assert pipe.sdxl and pipe.force_zeros_for_empty_prompt
    theirs = diffusers_sdxl(sdxl_root)
    with torch.no_grad():
        context, negative, pooled, negative_pooled = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    ours = pipe.encode_text(PROMPTS, (24, 40))
    assert ours.context.shape == (2, 77, 56) and ours.text_embeds.shape == (2, 16)
    np.testing.assert_allclose(np.asarray(ours.context), context.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.text_embeds), pooled.numpy(), rtol=0, atol=1e-5)
    assert np.asarray(ours.time_ids).tolist() == [[24, 40, 0, 0, 24, 40]] * 2
    uncond = pipe.encode_uncond((16, 16))
    assert not negative.any() and not negative_pooled.any()
    assert not np.asarray(uncond.context).any() and not np.asarray(uncond.text_embeds).any()
    assert np.asarray(uncond.time_ids).tolist() == [[16, 16, 0, 0, 16, 16]]


@pytest.mark.parametrize("steps", [1, 2])
def test_sampling_matches_diffusers(sdxl_root, latents, steps):
    """The folder's UNet sampled by ``sample`` against StableDiffusionXLPipeline on the same latents: DDIM
    with guidance 3, and one step (one call at t = T - 1, read as x0: diffusers with export's one-step DDIM)."""
    model = sample.load_sampling_model(sdxl_root)
    steps, guidance = sample.sampling_steps(model, steps, None if steps == 1 else 3.0)
    ours = sample.BatchedSampler(model, len(PROMPTS), steps=steps, guidance=guidance)(PROMPTS,
                                                                                     latents.transpose(0, 2, 3, 1))
    one_step = export.one_step_scheduler_config(NoiseSchedule.from_folder(sdxl_root), 999) if steps == 1 else None
    pipe = diffusers_sdxl(sdxl_root, one_step)
    with torch.no_grad():
        theirs = pipe(PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=steps,
                      guidance_scale=guidance if steps > 1 else 0.0, height=16, width=16, output_type="np").images
    diff = float(np.abs(ours - theirs).max())
    print(f"SDXL {steps} step(s): max |ours - diffusers| = {diff * 255:.4f} / 255")
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert diff <= TOLERANCE


def train_two_steps(teacher, workdir, *overrides) -> str:
    """Two steps of the trainer on the SDXL folder: the VSD step with the time ids of the training size, the
    LoRA teacher, the preview sampler, a checkpoint."""
    cmd = [sys.executable, "-m", "swiftbrush_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
           "--config.make_tiny_teacher=False", f"--config.teacher={teacher}", "--config.total_steps=2",
           "--config.checkpoint_every=2", "--config.sample_every=2", "--config.log_every=1",
           "--config.batch_size=2", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    return str(workdir)


@pytest.fixture(scope="module")
def workdir(sdxl_root, tmp_path_factory):
    return train_two_steps(sdxl_root, tmp_path_factory.mktemp("sdxl_train") / "work",
                           "--config.student_optimizer.lr=1e-2")


@pytest.fixture(scope="module")
def lora_workdir(sdxl_root, tmp_path_factory):
    """SwiftBrush v2's LoRA student (rank 2 over the teacher's attention) on SDXL."""
    return train_two_steps(sdxl_root, tmp_path_factory.mktemp("sdxl_lora") / "work", "--config.student_lora.rank=2",
                           "--config.student_lora.alpha=4.0", "--config.student_optimizer.lr=1e-1")


def one_step_diffusers(pipe, latents):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=1, guidance_scale=0.0,
                    output_type="np").images


def ours_one_step(source, latents):
    return sample.BatchedSampler(sample.load_sampling_model(source), len(PROMPTS))(PROMPTS,
                                                                                   latents.transpose(0, 2, 3, 1))


def test_student_samples_and_exports_to_a_diffusers_sdxl_pipeline(sdxl_root, workdir, latents, tmp_path):
    """The trained student's one-step images: moved from the teacher's, and reproduced by diffusers'
    StableDiffusionXLPipeline loading the exported folder (one step, guidance 0)."""
    from diffusers import StableDiffusionXLPipeline

    ours, before = ours_one_step(workdir, latents), ours_one_step(sdxl_root, latents)
    assert ours.shape == (2, 16, 16, 3) and np.isfinite(ours).all()
    assert np.abs(ours - before).max() > 1e-3
    out = export.export(workdir, str(tmp_path / "exported"))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.config.force_zeros_for_empty_prompt
    diff = float(np.abs(ours - one_step_diffusers(pipe, latents)).max())
    print(f"SDXL student, exported: max |ours - diffusers| = {diff * 255:.4f} / 255")
    assert diff <= TOLERANCE


def test_lora_student_exports_adapters_and_merges(sdxl_root, workdir, lora_workdir, latents, tmp_path):
    """A LoRA student on SDXL: ``export --lora-only`` loads into the teacher's StableDiffusionXLPipeline with
    diffusers' load_lora_weights and gives our images; ``merge`` of the whole and the LoRA student writes an
    SDXL folder whose one-step images diffusers reproduces."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from swiftbrush_jax import merge

    ours = ours_one_step(lora_workdir, latents)
    assert np.abs(ours - ours_one_step(sdxl_root, latents)).max() > 1e-3
    out = export.export_lora(lora_workdir, str(tmp_path / "lora_only"))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_root)
    pipe.scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.load_lora_weights(out)
    diff = float(np.abs(ours - one_step_diffusers(pipe, latents)).max())
    print(f"SDXL LoRA student, --lora-only: max |ours - diffusers| = {diff * 255:.4f} / 255")
    assert diff <= TOLERANCE

    merged = merge.merge(workdir, lora_workdir, 0.5, str(tmp_path / "merged"))
    theirs = one_step_diffusers(StableDiffusionXLPipeline.from_pretrained(merged), latents)
    assert float(np.abs(ours_one_step(merged, latents) - theirs).max()) <= TOLERANCE


def test_the_server_answers_an_sdxl_student_as_sample_draws_it(workdir, tmp_path):
    """``serve`` on the SDXL student's workdir: its PNG is the one ``sample`` writes for the same prompt and seed
    (both text encoders, the time ids of the noise's size), batched with another request or alone."""
    from test_serve import Served, concurrently, pixels, sampled

    expected = sampled(workdir, tmp_path, PROMPTS, 5, 1)
    served = Served("--model", workdir, "--batch-sizes", "1", "2")
    try:
        assert served.health["student"], served.health
        answers = concurrently([(served.image, (prompt, 5)) for prompt in PROMPTS])
        for prompt, (status, body, _) in zip(PROMPTS, answers):
            assert status == 200, body
            assert pixels(body).shape == (16, 16, 3)
            assert np.abs(pixels(body) - expected[(prompt, 5)]).max() <= TOLERANCE, prompt
    finally:
        served.close()


def test_sdxl_configs_and_what_is_refused(sdxl_root):
    """configs/sdxl.py's variants read; the CLIP loss on an SDXL teacher is refused by name."""
    from swiftbrush_jax import setup
    from swiftbrush_jax.config_base import load_config_file
    from swiftbrush_jax.errors import UsageError

    base = load_config_file(os.path.join(ROOT, "configs", "sdxl.py"))
    assert base.latent_size == 128 and base.teacher.endswith("stable-diffusion-xl-base-1.0")
    assert load_config_file(os.path.join(ROOT, "configs", "sdxl.py"), "turbo").student_init == "stabilityai/sdxl-turbo"
    assert load_config_file(os.path.join(ROOT, "configs", "sdxl.py"), "lora").student_lora.rank == 256
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    config.vsd.clip_weight = 0.1
    pipe = load_pipeline(sdxl_root, components=("tokenizer", "text_encoder"))
    with pytest.raises(UsageError, match="the CLIP loss is not supported for an SDXL teacher yet"):
        setup.clip_loss_parts(config, pipe)



def test_plan_counts_both_text_encoders(sdxl_root, tmp_path):
    """plan on an SDXL folder: the frozen inputs are the teacher UNet, both text encoders and the empty prompt's
    SDXL conditioning, byte for byte; the state is the student, its EMA, two Adam moments and the LoRA teacher."""
    import json

    import jax

    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--config.make_tiny_teacher=False", f"--config.teacher={sdxl_root}", "--resident-only", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    pipe = load_pipeline(sdxl_root, components=("unet", "text_encoder", "tokenizer"))
    nbytes = lambda tree: sum(x.size * 4 for x in jax.tree_util.tree_leaves(tree))  # tiny.py: float32 throughout
    assert set(pipe.text_params) == {"text_encoder", "text_encoder_2"}
    uncond = (77 * 56 + 16 + 6) * 4
    assert report["frozen_bytes"] == nbytes(pipe.unet_params) + nbytes(pipe.text_params) + uncond
    assert report["state_bytes"] > 4 * nbytes(pipe.unet_params)


def test_evaluation_generates_from_an_sdxl_student(workdir, tmp_path):
    """The COCO suite's generation from an SDXL workdir: every image is the student's one-step image of its
    caption from its recorded seed."""
    import json

    from swiftbrush_jax.evaluate import main as evaluate
    from swiftbrush_jax.evaluators import generation
    from swiftbrush_jax.generate import to_uint8

    captions = tmp_path / "captions.json"
    words = ["a red circle", "a blue square", "a green triangle"]
    annotations = [{"image_id": i, "id": i, "caption": w} for i, w in enumerate(words)]
    captions.write_text(json.dumps({"images": [{"id": i} for i in range(3)], "annotations": annotations}))
    out = str(tmp_path / "eval")
    evaluate(["--suite", "coco2014", "--model", workdir, "--out", out, "--captions", str(captions),
              "--num-images", "3", "--batch-size", "2", "--generate-only"])
    rows = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    assert len(rows) == 3
    model = sample.load_sampling_model(workdir)
    sampler = sample.BatchedSampler(model, 2)
    for row in rows:
        noise = sample.SeededNoise([row["seed"]], sample.latent_shape(model))[[0]]
        expected = to_uint8(sampler([row["prompt"]], noise))[0]
        np.testing.assert_array_equal(np.asarray(generation.read_image(out, row)), expected)
