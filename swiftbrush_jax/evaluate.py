"""Score a generator on the shapes suite against freshly rendered true images.

    python -m swiftbrush_jax.evaluate --suite shapes --model runs/shapes              # one-step EMA student
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 25 --guidance 3
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 1  # teacher x0 at T-1

For every prompt of the shapes vocabulary (or the first --num-prompts) it
draws --seeds latents from held-out noise seeds, generates, and scores with
swiftbrush_jax.metrics: colour / shape / joint accuracy, diversity across
seeds, and the Frechet distance to as many true renders (a seed range the
teacher never saw) of the same prompts. Prints one table row, writes JSON.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics
from .generate import decode_to_pixels, make_ddim_sampler, to_uint8
from .toy import shapes

NOISE_SEED = 10_000  # generation noise, disjoint from every training seed
TRUE_IMAGES_SEED = 20_000  # renders the teacher never saw
BATCH = 128


def rendered_truth(prompts: List[str], per_prompt: int, size_px: int, seed: int = TRUE_IMAGES_SEED) -> np.ndarray:
    """per_prompt true renders of each prompt, random placement and background, prompt-major."""
    out = []
    for index, prompt in enumerate(prompts):
        color, shape = shapes.parse_caption(prompt)
        attributes = shapes.sample_attributes(per_prompt, seed + index, size_px)
        attributes["color"] = np.full(per_prompt, color)
        attributes["shape"] = np.full(per_prompt, shape)
        out.append(shapes.render_batch(**attributes, size_px=size_px))
    return np.concatenate(out)


def make_one_step(pipe, t: int, output_is_x0: bool):
    """A jitted (unet params, z, cond) -> float images: x0 from one UNet call at t, VAE-decoded.

    output_is_x0: the UNet's output is x0 itself (the no-x0-parameterisation
    ablation); otherwise it is converted with the schedule, as the student is.
    """
    from .schedule import to_x0

    @jax.jit
    def sample(unet_params, vae_params, z, cond):
        timesteps = jnp.full((z.shape[0],), t, jnp.int32)
        out = pipe.unet.apply({"params": unet_params}, z, timesteps, cond).astype(jnp.float32)
        x0 = out if output_is_x0 else to_x0(pipe.schedule, out, z, timesteps)
        return decode_to_pixels(pipe.vae, vae_params, x0)

    return sample


def make_generator(model: str, steps: int, guidance: float, output_is_x0: bool):
    """(pipeline, generate(z, cond, uncond) -> float images in [0, 1], description) for a workdir or folder."""
    from .pipeline import load_pipeline

    if os.path.isdir(os.path.join(model, "checkpoints")):
        from .checkpoint import load_student

        params, meta, step = load_student(model)
        pipe = load_pipeline(meta["teacher_root"])
        sample = make_one_step(pipe, int(meta["student_t"]), output_is_x0)
        return (pipe, lambda z, cond, uncond: sample(params, pipe.vae_params, z, cond),
                f"student EMA step {step}, 1 step")
    pipe = load_pipeline(model)
    if steps == 1:
        last = pipe.schedule.num_train_timesteps - 1
        sample = make_one_step(pipe, last, False)
        return (pipe, lambda z, cond, uncond: sample(pipe.unet_params, pipe.vae_params, z, cond),
                f"teacher x0 at t={last}, 1 step")
    sample = make_ddim_sampler(pipe.unet, pipe.vae, pipe.schedule, steps, guidance)
    return (pipe, lambda z, cond, uncond: sample(pipe.unet_params, pipe.vae_params, z, cond, uncond),
            f"teacher DDIM {steps} steps, CFG {guidance:g}")


def generate_suite(pipe, generate, prompts: List[str], seeds: int) -> np.ndarray:
    """uint8 images, prompt-major: seeds images per prompt from held-out noise."""
    size = pipe.unet.config.sample_size
    channels = pipe.unet.config.in_channels
    all_prompts = [p for p in prompts for _ in range(seeds)]
    z = jax.random.normal(jax.random.PRNGKey(NOISE_SEED), (len(all_prompts), size, size, channels))
    cond = pipe.encode_text(all_prompts)
    uncond = pipe.encode_text([""])
    out = [to_uint8(generate(z[i:i + BATCH], cond[i:i + BATCH], uncond)) for i in range(0, len(z), BATCH)]
    return np.concatenate(out)


def score_suite(images: np.ndarray, prompts: List[str], seeds: int) -> Dict[str, float]:
    """Accuracy, diversity and Frechet distance of prompt-major images."""
    captions = [p for p in prompts for _ in range(seeds)]
    result = metrics.score(images, captions)
    result.update(metrics.diversity(images.reshape((len(prompts), seeds) + images.shape[1:])))
    truth = rendered_truth(prompts, seeds, images.shape[1])
    result["frechet_distance"] = metrics.frechet_distance(images, truth)
    return result


def evaluate(model: str, steps: int = 1, guidance: float = 1.0, num_prompts: int = 0, seeds: int = 8,
             output_is_x0: bool = False) -> Dict:
    """Generate and score; returns the JSON record (metrics, settings, images for grids under "images")."""
    prompts = shapes.all_prompts()
    prompts = prompts[:num_prompts] if num_prompts else prompts
    t0 = time.time()
    pipe, generate, description = make_generator(model, steps, guidance, output_is_x0)
    images = generate_suite(pipe, generate, prompts, seeds)
    result = {"model": model, "description": description, "steps": steps, "guidance": guidance,
              "num_prompts": len(prompts), "seeds": seeds, **score_suite(images, prompts, seeds),
              "seconds": time.time() - t0}
    return {**result, "images": images}


TABLE_COLUMNS = ("color_accuracy", "shape_accuracy", "joint_accuracy", "pairwise_rms", "frechet_distance")


def table_row(result: Dict) -> str:
    return "| " + " | ".join([result["description"]] + [f"{result[k]:.3f}" for k in TABLE_COLUMNS]) + " |"


def table_header() -> str:
    return "| model | " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * (len(TABLE_COLUMNS) + 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["shapes"], required=True)
    parser.add_argument("--model", required=True, help="training workdir (student) or diffusers folder (teacher)")
    parser.add_argument("--steps", type=int, default=1, help="diffusers folder: 1 = x0 at T-1, N = DDIM")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale of DDIM (<= 1: conditional only)")
    parser.add_argument("--num-prompts", type=int, default=0, help="first P prompts of the vocabulary (0: all 18)")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--student-outputs-x0", action="store_true",
                        help="the student was trained without the x0 parameterisation (ablation)")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--grid", help="write an image grid PNG here (one row per prompt)")
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.steps, args.guidance, args.num_prompts, args.seeds, args.student_outputs_x0)
    images = result.pop("images")
    print(table_header())
    print(table_row(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")
    if args.grid:
        write_grid(args.grid, images, args.seeds)


def write_grid(path: str, images: np.ndarray, seeds: int) -> None:
    """One row per prompt, one column per seed."""
    from PIL import Image

    from .generate import image_grid

    Image.fromarray(image_grid(images, seeds)).save(path)


if __name__ == "__main__":
    main(sys.argv[1:])
