"""The cost of the papers' evaluation (swiftbrush_jax.evaluators.paper_suites): generation speed on this machine and the
FLOPs of the 30K-image SD 2.1 COCO evaluation.

    python benchmarks/eval_generation.py --json benchmarks/results/eval_generation_cpu.json

Images/s are measured through the evaluation's own generation step (seeded noise,
``sample.BatchedSampler`` in one step, PNG files, manifest) for the tiny random
pipeline and the shipped shapes teacher, after one warm-up batch that compiles.
The FLOPs are XLA's cost analysis of the lowered (not compiled) text encoder,
UNet and VAE decoder of SD 2.1-base's architecture (``swiftbrush_jax.models.presets``)
with abstract parameters, so no weights are needed: one image of a one-step
student is text encoder + UNet + decoder; the 25-step teacher with
classifier-free guidance is the text encoder, 50 UNet calls (conditional and
unconditional at each step) and the decoder (the empty prompt is encoded once
per run, as ``BatchedSampler`` does).
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import describe, format_table, hardware, write_json  # noqa: E402

COCO_IMAGES = 30_000
TEACHER_STEPS = 25  # the SD 2.1 row of SwiftBrush's Table 1 (docs/method.md §7)


def generation_rate(folder: str, batch_size: int, images: int) -> dict:
    """Images/s of the evaluation's generation step after a warm-up batch (compilation), one step."""
    from swiftbrush_jax.evaluators import generation
    from swiftbrush_jax.sample import BatchedSampler, latent_shape, load_sampling_model

    model = load_sampling_model(folder)
    sampler = BatchedSampler(model, batch_size, 1, 1.0)
    prompts = [f"a red circle number {i}" for i in range(batch_size + images)]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        generation.generate(sampler, latent_shape(model), prompts, out, 0, range(batch_size),
                            os.path.join(out, "manifest.jsonl"))
        first_batch_s = time.perf_counter() - start
        start = time.perf_counter()
        generation.generate(sampler, latent_shape(model), prompts, out, 0, range(batch_size, batch_size + images),
                            os.path.join(out, "manifest.jsonl"))
        seconds = time.perf_counter() - start
    side = latent_shape(model)[0] * 2 ** (len(model.pipe.vae.config.block_out_channels) - 1)
    return {"batch": sampler.batch_size, "images": images, "image_px": side, "images_per_s": images / seconds,
            "first_batch_s": first_batch_s}


def lowered_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def sd21_flops_per_image() -> dict:
    """FLOPs of one image's text encoder, UNet call and VAE decode at SD 2.1-base's 512 px, batch 1."""
    from swiftbrush_jax.models import presets
    from swiftbrush_jax.models.text_encoder import CLIPTextConfig, CLIPTextModel
    from swiftbrush_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
    from swiftbrush_jax.models.vae import AutoencoderKL, VAEConfig

    configs = presets.SD21_BASE
    unet_cfg = UNetConfig.from_diffusers(configs["unet"])
    text_cfg = CLIPTextConfig.from_transformers(configs["text_encoder"])
    unet, text, vae = (UNet2DConditionModel(unet_cfg), CLIPTextModel(text_cfg),
                       AutoencoderKL(VAEConfig.from_diffusers(configs["vae"])))
    key = jax.random.PRNGKey(0)
    side = configs["unet"]["sample_size"]
    ids = jax.ShapeDtypeStruct((1, text_cfg.max_position_embeddings), jnp.int32)
    z = jax.ShapeDtypeStruct((1, side, side, 4), jnp.float32)
    cond = jax.ShapeDtypeStruct((1, text_cfg.max_position_embeddings, text_cfg.hidden_size), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text_params = jax.eval_shape(text.init, key, ids)["params"]
    vae_params = jax.eval_shape(vae.init, key, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
    return {
        "text_encoder": lowered_flops(lambda p, i: text.apply({"params": p}, i), text_params, ids),
        "unet": lowered_flops(lambda p, x, s, c: unet.apply({"params": p}, x, s, c), unet_param_shapes(unet_cfg),
                              z, t, cond),
        "vae_decode": lowered_flops(lambda p, x: vae.apply({"params": p}, x, method=vae.decode), vae_params, z),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=64, help="images timed per pipeline, after the warm-up batch")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from swiftbrush_jax.toy import tiny_teacher as tiny
    from swiftbrush_jax import toy

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in (("tiny", tiny.make_tiny_pipeline(os.path.join(tmp, "tiny"), seed=0)),
                             ("shapes", toy.teacher_path())):
            row = {"pipeline": name, **generation_rate(folder, args.batch, args.images)}
            print(f"{name}: {row['images_per_s']:.1f} images/s ({row['image_px']} px, batch {row['batch']})",
                  flush=True)
            rows.append(row)

    per_image = sd21_flops_per_image()
    student = per_image["text_encoder"] + per_image["unet"] + per_image["vae_decode"]
    teacher = per_image["text_encoder"] + 2 * TEACHER_STEPS * per_image["unet"] + per_image["vae_decode"]
    flops = {"per_image": per_image, "student_one_step_per_image": student,
             f"teacher_{TEACHER_STEPS}_steps_cfg_per_image": teacher,
             "coco_30k_student": COCO_IMAGES * student,
             f"coco_30k_teacher_{TEACHER_STEPS}_steps": COCO_IMAGES * teacher}
    hw = hardware()
    print(format_table(rows, ["pipeline", "image_px", "batch", "images_per_s", "first_batch_s"]))
    print(f"SD 2.1-base per image: text encoder {per_image['text_encoder'] / 1e9:.1f} GFLOP, UNet "
          f"{per_image['unet'] / 1e9:.1f} GFLOP, VAE decoder {per_image['vae_decode'] / 1e9:.1f} GFLOP")
    print(f"30K COCO images: one-step student {flops['coco_30k_student'] / 1e15:.1f} PFLOP, "
          f"{TEACHER_STEPS}-step teacher with CFG {flops[f'coco_30k_teacher_{TEACHER_STEPS}_steps'] / 1e15:.1f} PFLOP")
    print(f"hardware: {describe(hw)}")
    if args.json:
        write_json(args.json, {"benchmark": "eval_generation", "hardware": hw, "generation": rows, "flops": flops})


if __name__ == "__main__":
    main()
