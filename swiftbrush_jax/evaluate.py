"""Score a generator on the shapes suite against freshly rendered true images.

    python -m swiftbrush_jax.evaluate --suite shapes --model runs/shapes              # one-step EMA student
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 25 --guidance 3
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 1  # teacher x0 at T-1

Suites: ``shapes`` (below); ``coco2014`` and ``hps``, the papers' FID, CLIP
score and HPSv2 (``swiftbrush_jax.paper_eval``, see its ``--help``).

For every prompt of the shapes vocabulary (or the first --num-prompts) it
draws latents from held-out noise seeds, generates, and scores with
swiftbrush_jax.evaluators.shapes_scores: colour / shape / joint accuracy on the fully
specified prompts, accuracy of the named attributes and coverage_distance on
the under-specified ones, diversity across seeds, and the Frechet distance
to as many true renders (a seed range the teacher never saw) of the same
prompts. A prompt gets --seeds images per (colour, shape) combination that
answers it: 8 for "a red circle", 48 for "a circle", 144 for "a shape", so
each combination is seen equally often. Prints one table row, writes JSON.
"""

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import jax
import numpy as np

from .evaluators import shapes_scores as metrics
from .errors import ArgumentParser, exit_on_user_error
from .generate import to_uint8
from .toy import shapes

NOISE_SEED = 10_000  # generation noise, disjoint from every training seed
TRUE_IMAGES_SEED = 20_000  # renders the teacher never saw
BATCH = 128


def images_per_prompt(prompts: List[str], seeds: int) -> List[int]:
    """seeds images for each (colour, shape) combination a prompt allows."""
    return [seeds * shapes.open_choices(prompt) for prompt in prompts]


def by_prompt(images: np.ndarray, counts: List[int]) -> List[np.ndarray]:
    """Prompt-major images split into one array per prompt."""
    return np.split(images, np.cumsum(counts)[:-1])


def grid_images(images: np.ndarray, counts: List[int], seeds: int) -> np.ndarray:
    """Each prompt's first `seeds` images, prompt-major: the rows of a grid."""
    grid = np.stack([chunk[:seeds] for chunk in by_prompt(images, counts)])
    return grid.reshape((-1,) + images.shape[1:])


def rendered_truth(prompts: List[str], counts: List[int], size_px: int, seed: int = TRUE_IMAGES_SEED) -> np.ndarray:
    """counts[i] true renders of prompt i, prompt-major: random placement and background, open attributes
    drawn uniformly."""
    out = []
    for index, (prompt, count) in enumerate(zip(prompts, counts)):
        color, shape = shapes.parse_caption(prompt)
        attributes = shapes.sample_attributes(count, seed + index, size_px)
        if color is not None:
            attributes["color"] = np.full(count, color)
        if shape is not None:
            attributes["shape"] = np.full(count, shape)
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


def generate_suite(model, generate, prompts: List[str], counts: List[int], noise_seed: int = NOISE_SEED) -> np.ndarray:
    """uint8 images, prompt-major: counts[i] images of prompt i from held-out noise."""
    from .sample import latent_shape

    captions = [p for p, count in zip(prompts, counts) for _ in range(count)]
    z = jax.random.normal(jax.random.PRNGKey(noise_seed), (len(captions),) + latent_shape(model))
    out = []
    for i in range(0, len(z), BATCH):
        out.append(to_uint8(generate(z[i:i + BATCH], model.pipe.encode_text(captions[i:i + BATCH]))))
    return np.concatenate(out)


def score_suite(images: np.ndarray, prompts: List[str], counts: List[int]) -> Dict[str, float]:
    """Accuracy, coverage, diversity and Frechet distance of prompt-major images."""
    captions = [p for p, count in zip(prompts, counts) for _ in range(count)]
    result = metrics.score(images, captions)
    result.update(metrics.diversity(by_prompt(images, counts)))
    truth = rendered_truth(prompts, counts, images.shape[1])
    result["frechet_distance"] = metrics.frechet_distance(images, truth)
    return result


def evaluate(model: str, steps: Optional[int] = None, guidance: Optional[float] = None, num_prompts: int = 0,
             seeds: int = 8, noise_seed: int = NOISE_SEED) -> Dict:
    """Generate and score; returns the JSON record (metrics, settings, each prompt's first `seeds` images
    under "images", for grids)."""
    prompts = shapes.all_prompts()
    prompts = prompts[:num_prompts] if num_prompts else prompts
    t0 = time.time()
    sampling_model, generate, description = make_generator(model, steps, guidance)
    counts = images_per_prompt(prompts, seeds)
    images = generate_suite(sampling_model, generate, prompts, counts, noise_seed)
    result = {"model": model, "description": description, "steps": steps, "guidance": guidance,
              "num_prompts": len(prompts), "seeds": seeds, "noise_seed": noise_seed, "num_images": len(images),
              **score_suite(images, prompts, counts), "seconds": time.time() - t0}
    return {**result, "images": grid_images(images, counts, seeds)}


TABLE_COLUMNS = ("color_accuracy", "shape_accuracy", "joint_accuracy", "coverage_distance", "pairwise_rms",
                 "frechet_distance")


def table_row(result: Dict) -> str:
    cells = [f"{result[k]:.3f}" if k in result else "-" for k in TABLE_COLUMNS]
    return "| " + " | ".join([result["description"]] + cells) + " |"


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
    parser.add_argument("--num-prompts", type=int, default=0, help="first P prompts of the vocabulary: the 18 fully specified, then the 10 "
                        "under-specified (0: all 28)")
    parser.add_argument("--seeds", type=int, default=8,
                        help="images per prompt and answering (colour, shape): 8 gives 'a circle' 48")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--grid", help="write an image grid PNG here (one row per prompt, its first --seeds images)")
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


GRID_MIN_PX = 64


def write_grid(path: str, images: np.ndarray, seeds: int) -> None:
    """One row per prompt, one column per seed; small images enlarged (nearest) to at least GRID_MIN_PX."""
    from PIL import Image

    from .generate import image_grid

    factor = -(-GRID_MIN_PX // images.shape[1])
    Image.fromarray(image_grid(images.repeat(factor, axis=1).repeat(factor, axis=2), seeds)).save(path)


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
