"""The shapes suite: a generator scored against freshly rendered true images of the shapes world.

For every prompt of the shapes vocabulary (or the first ``num_prompts``) it
draws latents from held-out noise seeds, generates, and scores with
``shapes_scores``: colour / shape / joint accuracy on the fully specified
prompts, accuracy of the named attributes and coverage_distance on the
under-specified ones, diversity across seeds, and the Frechet distance to as
many true renders (a seed range the teacher never saw) of the same prompts. A
prompt gets ``seeds`` images per (colour, shape) combination that answers it:
8 for "a red circle", 48 for "a circle", 144 for "a shape", so each
combination is seen equally often.
"""

import time
from typing import Dict, List, Optional

import numpy as np

from ..generate import image_grid, to_uint8, upscaled
from ..toy import shapes
from . import records
from . import shapes_scores

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


def make_sampler(source: str, steps: Optional[int], guidance: Optional[float], step: Optional[int] = None,
                 ema: bool = True):
    """(model, BatchedSampler, description) for a workdir or diffusers folder.

    A workdir's student runs in one step as its checkpoint records; a diffusers folder as ``sample``
    runs it (``sample.sampling_steps``: DDIM with guidance, or one call at T - 1 for ``steps=1``)."""
    from ..sample import BatchedSampler, load_sampling_model, sampling_steps

    model = load_sampling_model(source, step, ema)
    steps, guidance = sampling_steps(model, steps, guidance)
    if steps > 1:
        description = f"teacher DDIM {steps} steps, CFG {guidance:g}"
    else:
        what = model.description if model.is_student else f"teacher x0 at t={model.one_step_t}"
        description = f"{what}, 1 step"
    return model, BatchedSampler(model, BATCH, steps, guidance), description


def generate_suite(model, sampler, prompts: List[str], counts: List[int], noise_seed: int = NOISE_SEED) -> np.ndarray:
    """uint8 images, prompt-major: counts[i] images of prompt i, image j from the noise of seed noise_seed + j."""
    from ..sample import SeededNoise, latent_shape

    captions = [p for p, count in zip(prompts, counts) for _ in range(count)]
    noise = SeededNoise(range(noise_seed, noise_seed + len(captions)), latent_shape(model))
    return np.stack([to_uint8(image) for _, image in sampler.images(captions, noise)])


def score_suite(images: np.ndarray, prompts: List[str], counts: List[int]) -> Dict[str, float]:
    """Accuracy, coverage, diversity and Frechet distance of prompt-major images."""
    captions = [p for p, count in zip(prompts, counts) for _ in range(count)]
    result = shapes_scores.score(images, captions)
    result.update(shapes_scores.diversity(by_prompt(images, counts)))
    truth = rendered_truth(prompts, counts, images.shape[1])
    result["frechet_distance"] = shapes_scores.frechet_distance(images, truth)
    return result


def evaluate(model: str, steps: Optional[int] = None, guidance: Optional[float] = None, num_prompts: int = 0,
             seeds: int = 8, noise_seed: int = NOISE_SEED, step: Optional[int] = None, ema: bool = True) -> Dict:
    """Generate and score; returns the JSON record (metrics, settings, each prompt's first `seeds` images
    under "images", for grids)."""
    prompts = shapes.all_prompts()
    prompts = prompts[:num_prompts] if num_prompts else prompts
    t0 = time.time()
    sampling_model, sampler, description = make_sampler(model, steps, guidance, step, ema)
    counts = images_per_prompt(prompts, seeds)
    images = generate_suite(sampling_model, sampler, prompts, counts, noise_seed)
    result = {"model": model, "description": description, "steps": steps, "guidance": guidance,
              "num_prompts": len(prompts), "seeds": seeds, "noise_seed": noise_seed, "num_images": len(images),
              **score_suite(images, prompts, counts), "seconds": time.time() - t0}
    return {**result, "images": grid_images(images, counts, seeds)}


TABLE_COLUMNS = ("color_accuracy", "shape_accuracy", "joint_accuracy", "coverage_distance", "pairwise_rms",
                 "frechet_distance")


def markdown_table(results: List[Dict]) -> str:
    """One row per result: the model, then TABLE_COLUMNS to 3 decimals."""
    rows = [[r["description"]] + [f"{r[k]:.3f}" if k in r else "-" for k in TABLE_COLUMNS] for r in results]
    return records.markdown(["model", *TABLE_COLUMNS], rows)


GRID_MIN_PX = 64


def write_grid(path: str, images: np.ndarray, seeds: int) -> None:
    """One row per prompt, one column per seed; small images enlarged (nearest) to at least GRID_MIN_PX."""
    from PIL import Image

    Image.fromarray(image_grid(upscaled(images, GRID_MIN_PX), seeds)).save(path)
