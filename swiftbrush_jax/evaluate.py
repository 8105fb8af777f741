"""Score a generator on the shapes suite against freshly rendered true images.

    python -m swiftbrush_jax.evaluate --suite shapes --model runs/shapes              # one-step EMA student
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 25 --guidance 3
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 1  # teacher x0 at T-1

Suites: ``shapes`` (below); ``coco2014`` and ``hps``, the papers' FID, CLIP
score and HPSv2 (``swiftbrush_jax.paper_eval``, see its ``--help``).

For every prompt of the shapes vocabulary (or the first --num-prompts) it
draws --seeds latents from held-out noise seeds, generates, and scores with
swiftbrush_jax.metrics: colour / shape / joint accuracy, diversity across
seeds, and the Frechet distance to as many true renders (a seed range the
teacher never saw) of the same prompts. Prints one table row, writes JSON.
"""

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import jax
import numpy as np

from . import metrics
from .errors import ArgumentParser, exit_on_user_error
from .generate import to_uint8
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


def make_generator(source: str, steps: Optional[int], guidance: Optional[float]):
    """(model, generate(z, cond) -> float images in [0, 1], description) for a workdir or diffusers folder.

    A workdir's student runs in one step as its checkpoint records; a diffusers folder as ``sample``
    runs it (``sample.sampling_steps``: DDIM with guidance, or one call at T - 1 for ``steps=1``)."""
    from .sample import load_sampling_model, make_images, sampling_steps

    model = load_sampling_model(source)
    steps, guidance = sampling_steps(model, steps, guidance)
    if steps > 1:
        description = f"teacher DDIM {steps} steps, CFG {guidance:g}"
    else:
        what = model.description if model.is_student else f"teacher x0 at t={model.one_step_t}"
        description = f"{what}, 1 step"
    return model, make_images(model, steps, guidance), description


def generate_suite(model, generate, prompts: List[str], seeds: int) -> np.ndarray:
    """uint8 images, prompt-major: seeds images per prompt from held-out noise."""
    from .sample import latent_shape

    all_prompts = [p for p in prompts for _ in range(seeds)]
    z = jax.random.normal(jax.random.PRNGKey(NOISE_SEED), (len(all_prompts),) + latent_shape(model))
    cond = model.pipe.encode_text(all_prompts)
    out = [to_uint8(generate(z[i:i + BATCH], cond[i:i + BATCH])) for i in range(0, len(z), BATCH)]
    return np.concatenate(out)


def score_suite(images: np.ndarray, prompts: List[str], seeds: int) -> Dict[str, float]:
    """Accuracy, diversity and Frechet distance of prompt-major images."""
    captions = [p for p in prompts for _ in range(seeds)]
    result = metrics.score(images, captions)
    result.update(metrics.diversity(images.reshape((len(prompts), seeds) + images.shape[1:])))
    truth = rendered_truth(prompts, seeds, images.shape[1])
    result["frechet_distance"] = metrics.frechet_distance(images, truth)
    return result


def evaluate(model: str, steps: Optional[int] = None, guidance: Optional[float] = None, num_prompts: int = 0,
             seeds: int = 8) -> Dict:
    """Generate and score; returns the JSON record (metrics, settings, images for grids under "images")."""
    prompts = shapes.all_prompts()
    prompts = prompts[:num_prompts] if num_prompts else prompts
    t0 = time.time()
    sampling_model, generate, description = make_generator(model, steps, guidance)
    images = generate_suite(sampling_model, generate, prompts, seeds)
    result = {"model": model, "description": description, "steps": steps, "guidance": guidance,
              "num_prompts": len(prompts), "seeds": seeds, **score_suite(images, prompts, seeds),
              "seconds": time.time() - t0}
    return {**result, "images": images}


TABLE_COLUMNS = ("color_accuracy", "shape_accuracy", "joint_accuracy", "pairwise_rms", "frechet_distance")


def table_row(result: Dict) -> str:
    return "| " + " | ".join([result["description"]] + [f"{result[k]:.3f}" for k in TABLE_COLUMNS]) + " |"


def table_header() -> str:
    return "| model | " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * (len(TABLE_COLUMNS) + 1)


SUITES = ("shapes", "coco2014", "hps")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    suite = argparse.ArgumentParser(add_help=False)
    suite.add_argument("--suite", choices=SUITES)
    if suite.parse_known_args(argv)[0].suite in ("coco2014", "hps") or "--table" in argv:
        from . import paper_eval

        return paper_eval.main(argv)
    from .sample import add_sampling_flags

    parser = ArgumentParser("python -m swiftbrush_jax.evaluate", __doc__)
    parser.add_argument("--suite", choices=SUITES, required=True,
                        help="shapes: the laptop suite below; coco2014, hps: see swiftbrush_jax.paper_eval --help")
    parser.add_argument("--model", required=True, help="training workdir (student) or diffusers folder (teacher)")
    add_sampling_flags(parser)
    parser.add_argument("--num-prompts", type=int, default=0, help="first P prompts of the vocabulary (0: all 18)")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--grid", help="write an image grid PNG here (one row per prompt)")
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.steps, args.guidance, args.num_prompts, args.seeds)
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
    exit_on_user_error(main)(sys.argv[1:])
