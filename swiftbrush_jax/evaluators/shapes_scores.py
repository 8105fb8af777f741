"""Analytic scores for images of the shapes world (swiftbrush_jax.toy.shapes), numpy only.

No learned evaluator: each image is read back by geometry and colour.

`analyze` finds the shape. The image is box-smoothed (3x3) against pixel
noise; the background is a plane per channel fitted to the 2-pixel border,
ignoring border pixels far from the border median (a shape touching the
edge); the foreground is every pixel whose RGB distance from that plane
exceeds max(ABS_THRESHOLD, half the image's peak distance), a half-maximum
contour that keeps a blurred shape's area. Its colour is the hue of the mean
of its core pixels (distance >= 0.75 x peak), snapped to the nearest palette
hue; its shape is the template (circle, square, triangle of the mask's area,
placed on the mask's centroid) with the highest soft IoU. An image "has a
foreground" when the mask has at least MIN_AREA_FRACTION of the pixels and
its best IoU reaches MIN_SHAPE_IOU, so noise speckle or a smear does not count.

Images may be uint8 in 0..255 or floats in [0, 1], shaped (n, H, W, 3).
"""

from typing import Dict, Sequence

import numpy as np

from swiftbrush_jax.toy import shapes

ABS_THRESHOLD = 60.0
PEAK_QUANTILE = 0.995
CORE_FRACTION = 0.75
BORDER_PX = 2
BORDER_INLIER_DISTANCE = 40.0
MIN_AREA_FRACTION = 0.002
MIN_SHAPE_IOU = 0.5
CHUNK = 256
POOLED_GRID = 4
HISTOGRAM_LEVELS = 3


def to_unit_float(images) -> np.ndarray:
    """Images as float32 in [0, 1]: uint8 is divided by 255, floats are clipped."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images shaped (n, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in radians of RGB colours (..., 3): 0 red, 2pi/3 green, 4pi/3 blue."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)


PALETTE_HUE = hue(shapes.COLOR_RGB)


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index of the palette colour whose hue is closest (on the circle) to each colour's hue."""
    gap = np.angle(np.exp(1j * (hue(rgb)[..., None] - PALETTE_HUE)))
    return np.argmin(np.abs(gap), axis=-1)


def box_smooth(images: np.ndarray) -> np.ndarray:
    """3x3 mean filter over H and W with edge padding, for (n, H, W, C)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:])[:, :height, :width] / 9.0


def rgb_norm(difference: np.ndarray) -> np.ndarray:
    """Euclidean length over the last (RGB) axis."""
    return np.sqrt((difference * difference).sum(axis=-1))


def edge_quality(raw_distance: np.ndarray, mask: np.ndarray, peak: np.ndarray):
    """How sharp the shape's outline is: (sharpness, edge_band), each (n,) in about [0, 1].

    sharpness: mean over the mask's boundary pixels of the largest step in
    unsmoothed distance-from-background to a 4-neighbour, over the peak; near
    1 for a crisp edge, about 0.3 after a 1.5-pixel Gaussian blur.
    edge_band: pixels between 25% and 75% of the peak, as a fraction of
    those plus the mask; small for a crisp edge, growing with blur.
    """
    padded = np.pad(raw_distance, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = padded[:, 1:-1, 1:-1]
    neighbours = (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:])
    step = np.max([np.abs(centre - other) for other in neighbours], axis=0)
    inside = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="constant")
    interior = inside[:, :-2, 1:-1] & inside[:, 2:, 1:-1] & inside[:, 1:-1, :-2] & inside[:, 1:-1, 2:]
    boundary = mask & ~interior
    boundary_count = boundary.sum(axis=(1, 2))
    safe_peak = np.maximum(peak, 1e-6)
    sharpness = (step * boundary).sum(axis=(1, 2)) / np.maximum(boundary_count, 1) / safe_peak
    relative = raw_distance / safe_peak[:, None, None]
    band = ((relative > 0.25) & (relative < 0.75)).sum(axis=(1, 2))
    return sharpness, band / np.maximum(band + mask.sum(axis=(1, 2)), 1)


def background_plane(images: np.ndarray) -> np.ndarray:
    """Per-image, per-channel plane a + b x + c y fitted to the border; returns (n, H, W, 3).

    Border pixels farther than BORDER_INLIER_DISTANCE from the border median
    get almost no weight, so a shape that reaches the edge does not tint it.
    """
    n, height, width, _ = images.shape
    y, x = np.mgrid[0:height, 0:width]
    on_border = ((y < BORDER_PX) | (y >= height - BORDER_PX) | (x < BORDER_PX) | (x >= width - BORDER_PX))
    design_full = np.stack([np.ones_like(x), x / width - 0.5, y / height - 0.5], -1).astype(np.float64)
    design = design_full[on_border]
    border = images[:, on_border].astype(np.float64)
    median = np.median(border, axis=1, keepdims=True)
    inlier = rgb_norm(border - median) < BORDER_INLIER_DISTANCE
    weight = np.where(inlier, 1.0, 1e-3)
    weighted = (weight[:, :, None] * design).transpose(0, 2, 1)
    coefficients = np.linalg.solve(weighted @ design, weighted @ border)
    plane = design_full.reshape(-1, 3) @ coefficients
    return plane.reshape(n, height, width, 3).astype(np.float32)


def template_ious(mask: np.ndarray, area: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """Soft IoU of each mask with a circle, square and triangle of its area on its centroid: (n, 3)."""
    height, width = mask.shape[1:]
    x = shapes.pixel_centres(width)[None, None, :]
    y = shapes.pixel_centres(height)[None, :, None]
    cx, cy = centroid[:, 0, None, None], centroid[:, 1, None, None]
    ious = []
    for index in range(len(shapes.SHAPES)):
        size = np.sqrt(area / shapes.AREA_PER_SIZE_SQ[index])[:, None, None]
        template = shapes.shape_coverage(index, x, y, cx, cy - shapes.CENTROID_DY_PER_SIZE[index] * size, size)
        overlap = (mask * template).sum(axis=(1, 2))
        union = area + template.sum(axis=(1, 2)) - overlap
        ious.append(overlap / np.maximum(union, 1e-6))
    return np.stack(ious, axis=1)


def _analyze_chunk(images: np.ndarray) -> Dict[str, np.ndarray]:
    """analyze() on one chunk of images already in 0..255 float32."""
    n, height, width, _ = images.shape
    smooth = box_smooth(images)
    background = background_plane(smooth)
    distance = rgb_norm(smooth - background)
    peak = np.quantile(distance.reshape(n, -1), PEAK_QUANTILE, axis=1)
    threshold = np.maximum(ABS_THRESHOLD, 0.5 * peak)
    mask = distance > threshold[:, None, None]
    maskf = mask.astype(np.float32)
    area = maskf.sum(axis=(1, 2))
    safe_area = np.maximum(area, 1.0)
    x = shapes.pixel_centres(width)
    y = shapes.pixel_centres(height)
    centroid = np.stack([(maskf.sum(axis=1) * x).sum(axis=1), (maskf.sum(axis=2) * y).sum(axis=1)], 1)
    centroid = np.where(area[:, None] > 0, centroid / safe_area[:, None], [width / 2.0, height / 2.0])
    core = mask & (distance >= np.maximum(threshold, CORE_FRACTION * peak)[:, None, None])
    core_count = core.sum(axis=(1, 2))
    core_sum = core.reshape(n, 1, -1).astype(np.float32) @ images.reshape(n, -1, 3)
    fg_color = core_sum[:, 0] / np.maximum(core_count, 1)[:, None]
    ious = template_ious(maskf, area, centroid)
    sharpness, edge_band = edge_quality(rgb_norm(images - background), mask, peak)
    found = (area >= MIN_AREA_FRACTION * height * width) & (core_count > 0) & (ious.max(axis=1) >= MIN_SHAPE_IOU)
    return {
        "found": found,
        "color": np.where(found, nearest_color(fg_color), -1),
        "shape": np.where(found, np.argmax(ious, axis=1), -1),
        "fg_color": fg_color,
        "background": background[:, height // 2, width // 2],
        "centroid": centroid,
        "area": area,
        "size": np.sqrt(area),
        "shape_iou": ious,
        "sharpness": sharpness,
        "edge_band": edge_band,
        "mask": mask,
    }


def analyze(images) -> Dict[str, np.ndarray]:
    """Read colour, shape, position and size back from each image.

    Returns per-image arrays: found (bool), color and shape (vocabulary
    indices, -1 where nothing was found), fg_color (mean RGB 0..255 of the
    shape's core), background (fitted RGB 0..255 at the image centre),
    centroid ((x, y) in pixels, pixel centres at i + 0.5; the image centre
    when nothing was found), area (pixels), size (sqrt of area), shape_iou
    ((n, 3) IoU with circle, square, triangle templates), sharpness and
    edge_band (see edge_quality) and mask (n, H, W).
    """
    pixels = to_unit_float(images) * 255.0
    if len(pixels) == 0:
        raise ValueError("no images to analyze")
    chunks = [_analyze_chunk(pixels[start:start + CHUNK]) for start in range(0, len(pixels), CHUNK)]
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def score(images, prompts: Sequence[str]) -> Dict[str, float]:
    """Accuracy against the prompts and, where prompts leave attributes open, coverage (score_analysis)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return score_analysis(analyze(images), prompts)


def score_analysis(analysis: Dict[str, np.ndarray], prompts: Sequence[str]) -> Dict[str, float]:
    """score() from an analyze() result, for callers that also need the analysis.

    color_accuracy, shape_accuracy and joint_accuracy: fractions of the images of
    fully specified prompts whose colour, shape, and both, match; present when
    there are such prompts. For under-specified prompts ("a circle", "a red
    shape", "a shape"): open_prompt_accuracy, the fraction whose named
    attributes match (a found shape, for "a shape"), and coverage_distance.
    An image in which no shape was found is wrong everywhere.
    """
    if len(analysis["found"]) != len(prompts):
        raise ValueError(f"{len(analysis['found'])} analysed images for {len(prompts)} prompts")
    wanted = [shapes.parse_caption(prompt) for prompt in prompts]
    color_wanted = np.array([-1 if color is None else color for color, _ in wanted])
    shape_wanted = np.array([-1 if shape is None else shape for _, shape in wanted])
    color_ok = analysis["color"] == color_wanted
    shape_ok = analysis["shape"] == shape_wanted
    specified = (color_wanted >= 0) & (shape_wanted >= 0)
    result = {"found_rate": float(analysis["found"].mean())}
    if specified.any():
        result.update(color_accuracy=float(color_ok[specified].mean()),
                      shape_accuracy=float(shape_ok[specified].mean()),
                      joint_accuracy=float((color_ok & shape_ok)[specified].mean()))
    if not specified.all():
        named_ok = (analysis["found"] & np.where(color_wanted >= 0, color_ok, True)
                    & np.where(shape_wanted >= 0, shape_ok, True))
        result["open_prompt_accuracy"] = float(named_ok[~specified].mean())
        result["coverage_by_prompt"] = coverage_by_prompt(analysis, prompts)
        result["coverage_distance"] = mean_coverage(result["coverage_by_prompt"])
    return result


def coverage_distance(analysis: Dict[str, np.ndarray], prompts: Sequence[str]) -> float:
    """Mean over the under-specified prompts of coverage_by_prompt."""
    return mean_coverage(coverage_by_prompt(analysis, prompts))


def mean_coverage(by_prompt: Dict[str, float]) -> float:
    """coverage_distance from coverage_by_prompt's result."""
    if not by_prompt:
        raise ValueError("coverage_distance needs an under-specified prompt")
    return float(np.mean(list(by_prompt.values())))


def coverage_by_prompt(analysis: Dict[str, np.ndarray], prompts: Sequence[str]) -> Dict[str, float]:
    """Each under-specified prompt's total-variation distance between the generated and the true distribution
    of its open attributes (which prompt a generator fails to cover, where coverage_distance says how much).

    The truth is uniform over the open (colour, shape) combinations: 6 for "a circle", 3 for "a red shape",
    18 for "a shape". An image in which no shape was found is an outcome the truth never has. 0 is perfect
    coverage; all images of "a circle" in one colour give 5/6. From n images a perfect generator still
    scores about 0.4 * sqrt((k - 1) / n) for k combinations (sampling noise): compare generators at equal n.
    """
    distances = {}
    for prompt in dict.fromkeys(prompts):
        color, shape = shapes.parse_caption(prompt)
        if color is not None and shape is not None:
            continue
        index = np.array([p == prompt for p in prompts])
        found = analysis["found"][index]
        outcome = (np.where(color is None, analysis["color"][index], 0) * len(shapes.SHAPES)
                   + np.where(shape is None, analysis["shape"][index], 0))
        choices = shapes.open_choices(prompt)
        counts = np.bincount(outcome[found], minlength=len(shapes.COLOR_NAMES) * len(shapes.SHAPES))
        generated = counts / len(outcome)
        truth = np.zeros_like(generated)
        for c in (range(len(shapes.COLOR_NAMES)) if color is None else [0]):
            for s in (range(len(shapes.SHAPES)) if shape is None else [0]):
                truth[c * len(shapes.SHAPES) + s] = 1.0 / choices
        distances[prompt] = float(0.5 * (np.abs(generated - truth).sum() + (~found).mean()))
    return distances


def mean_pairwise_rms(images) -> float:
    """Mean over distinct pairs of the RMS per-pixel difference, pixels in [0, 1]."""
    flat = to_unit_float(images).reshape(len(images), -1).astype(np.float64)
    if len(flat) < 2:
        raise ValueError("pairwise distance needs at least 2 images")
    norms = (flat * flat).sum(axis=1)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * flat @ flat.T, 0.0)
    upper = np.triu_indices(len(flat), k=1)
    return float(np.sqrt(squared[upper] / flat.shape[1]).mean())


def diversity(images_by_prompt: Sequence) -> Dict[str, float]:
    """Spread of samples across seeds, one (S, H, W, 3) array per prompt, averaged over prompts.

    centroid_x_std, centroid_y_std and size_std (pixels) use only images in
    which a shape was found and only prompts with at least two of them (nan
    if no prompt has); pairwise_rms is mean_pairwise_rms over all images.
    """
    geometry, pairwise = [], []
    for images in images_by_prompt:
        analysis = analyze(images)
        found = analysis["found"]
        pairwise.append(mean_pairwise_rms(images))
        if found.sum() >= 2:
            centroid = analysis["centroid"][found]
            geometry.append([centroid[:, 0].std(), centroid[:, 1].std(), analysis["size"][found].std()])
    geometry = np.mean(geometry, axis=0) if geometry else np.full(3, np.nan)
    return {
        "centroid_x_std": float(geometry[0]),
        "centroid_y_std": float(geometry[1]),
        "size_std": float(geometry[2]),
        "pairwise_rms": float(np.mean(pairwise)),
    }


def frechet_features(images) -> np.ndarray:
    """Fixed analytic features for the Frechet distance, (n, D) float64, every entry in [0, 1].

    Concatenates: the image area-downsampled to 4x4 RGB (48 values); a
    joint RGB histogram with 3 levels per channel (27 pixel fractions); and
    the analyzer's geometry: found, centroid x and y and size as fractions
    of the image side, core colour / 255, the three template IoUs, edge
    sharpness and edge band (12), which make blur visible to the distance.
    Needs H and W divisible by 4. The grid is coarse on purpose: with 87
    dimensions a few hundred samples estimate the covariance well enough
    that two independent draws of the dataset score about 0.08 at n=300
    while a 1.5-pixel blur scores about 0.36 (an 8x8 grid: 0.44 and 0.71);
    placement and size are carried by the geometry features instead.
    """
    unit = to_unit_float(images)
    n, height, width, _ = unit.shape
    if height % POOLED_GRID or width % POOLED_GRID:
        raise ValueError(f"image side must be a multiple of {POOLED_GRID}, got {height}x{width}")
    blocks = unit.reshape(n, POOLED_GRID, height // POOLED_GRID, POOLED_GRID, width // POOLED_GRID, 3)
    pooled = blocks.mean(axis=(2, 4))
    levels = np.minimum((unit * HISTOGRAM_LEVELS).astype(np.int64), HISTOGRAM_LEVELS - 1)
    bins = (levels[..., 0] * HISTOGRAM_LEVELS + levels[..., 1]) * HISTOGRAM_LEVELS + levels[..., 2]
    offsets = np.arange(n)[:, None] * HISTOGRAM_LEVELS ** 3
    histogram = np.bincount((bins.reshape(n, -1) + offsets).ravel(), minlength=n * HISTOGRAM_LEVELS ** 3)
    histogram = histogram.reshape(n, -1) / float(height * width)
    analysis = analyze(images)
    geometry = np.concatenate([
        analysis["found"][:, None],
        analysis["centroid"] / [width, height],
        analysis["size"][:, None] / np.sqrt(height * width),
        analysis["fg_color"] / 255.0,
        analysis["shape_iou"],
        np.clip(analysis["sharpness"], 0.0, 1.0)[:, None],
        analysis["edge_band"][:, None],
    ], axis=1)
    return np.concatenate([pooled.reshape(n, -1), histogram, geometry], axis=1).astype(np.float64)


def frechet_distance_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b). With the Cholesky
    factor S_a = L L^T, S_a S_b is similar to the symmetric PSD matrix
    L^T S_b L, so the trace of the square root is the sum of square roots of
    its eigenvalues (eigvalsh; tiny negative ones clipped): no general matrix
    square root (scipy) and no eigenvectors. S_a gets a jitter of 1e-10 of
    its mean variance so that a singular covariance (fewer samples than
    features, constant features) still factors.
    """
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    dim = len(cov_a)
    jitter = 1e-10 * np.trace(cov_a) / dim + 1e-14
    lower = np.linalg.cholesky(cov_a + jitter * np.eye(dim))
    middle = lower.T @ cov_b @ lower
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return float(max(distance, 0.0))


def frechet_distance(images_a, images_b) -> float:
    """Frechet distance between two image sets in the frechet_features space (each set >= 2 images)."""
    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError("each image set needs at least 2 images for a covariance")
    return frechet_distance_from_features(frechet_features(images_a), frechet_features(images_b))
