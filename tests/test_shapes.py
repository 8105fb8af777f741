"""The procedural shapes dataset and the analytic metrics that score generations of it."""

import numpy as np
import pytest

from swiftbrush_jax.evaluators import shapes_scores
from swiftbrush_jax.toy import shapes

N = 300


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W (edge padding), float32 output in 0..255."""
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    height, width = images.shape[1:3]
    padded = np.pad(images.astype(np.float32), ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    rows = sum(w * padded[:, i:i + height] for i, w in enumerate(kernel))
    padded = np.pad(rows, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[:, :, i:i + width] for i, w in enumerate(kernel))


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset():
    return shapes.sample_dataset(N, seed=0)


@pytest.fixture(scope="module")
def clean_analysis(dataset):
    return shapes_scores.analyze(dataset[0])


@pytest.fixture(scope="module")
def other_dataset():
    return shapes.sample_dataset(N, seed=1)


def test_vocabulary_and_captions():
    prompts = shapes.all_prompts()
    specified, open_ = shapes.specified_prompts(), shapes.open_prompts()
    assert prompts == specified + open_ and len(prompts) == len(set(prompts)) == 18 + 10
    assert shapes.caption("red", "circle") == "a red circle"
    assert [shapes.caption(None, "circle"), shapes.caption("red", None), shapes.caption(None, None)] == [
        "a circle", "a red shape", "a shape"]
    for prompt in specified:
        color, shape = shapes.parse_caption(prompt)
        assert shapes.caption(shapes.COLOR_NAMES[color], shapes.SHAPES[shape]) == prompt
        assert shapes.open_choices(prompt) == 1
    for prompt in open_:
        color, shape = shapes.parse_caption(prompt)
        assert None in (color, shape)
        assert shapes.caption(None if color is None else shapes.COLOR_NAMES[color],
                              None if shape is None else shapes.SHAPES[shape]) == prompt
    assert [shapes.open_choices(p) for p in ("a circle", "a red shape", "a shape")] == [6, 3, 18]
    for bad in (lambda: shapes.caption("purple", "circle"), lambda: shapes.parse_caption("a red hexagon"),
                lambda: shapes.parse_caption("a purple shape"), lambda: shapes.parse_caption("two red circles")):
        with pytest.raises(ValueError):
            bad()


def test_sample_dataset_is_deterministic_by_seed(dataset, other_dataset):
    images, captions, attributes = dataset
    again, captions_again, _ = shapes.sample_dataset(N, seed=0)
    different = other_dataset[0]
    assert images.shape == (N, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and captions == captions_again
    assert not np.array_equal(images, different)
    assert captions[0] == shapes.caption(shapes.COLOR_NAMES[attributes["color"][0]],
                                         shapes.SHAPES[attributes["shape"][0]])
    assert set(captions) == set(shapes.specified_prompts())


def test_render_draws_the_shape_on_its_background():
    background = shapes.Background(gray=60.0, tint=(0.0, 0.0, 0.0), slope=(0.0, 0.0))
    image = shapes.render("red", "square", cx=32.0, cy=32.0, size=10.0, background=background)
    assert image.shape == (64, 64, 3)
    assert tuple(image[32, 32]) == shapes.COLORS["red"]
    assert tuple(image[2, 2]) == (60, 60, 60)
    assert (image[..., 1] < 50).sum() == 20 * 20
    triangle = shapes.render("blue", "triangle", 32.0, 32.0, 10.0, background)
    is_blue = np.all(triangle == shapes.COLORS["blue"], axis=-1)
    assert is_blue[25:42, 32].all() and not is_blue[20, 32] and not is_blue[25, 25]


def test_smaller_images_scale_the_shapes():
    images, captions, attributes = shapes.sample_dataset(100, seed=3, size_px=32)
    assert images.shape == (100, 32, 32, 3)
    assert attributes["size"].max() <= 11.0
    assert shapes_scores.score(images, captions)["joint_accuracy"] >= 0.98


def test_analyzer_recovers_clean_renders(dataset, clean_analysis):
    _, captions, attributes = dataset
    analysis = clean_analysis
    result = shapes_scores.score_analysis(analysis, captions)
    assert result["color_accuracy"] >= 0.98 and result["shape_accuracy"] >= 0.98
    assert analysis["found"].all()
    shape, size = attributes["shape"], attributes["size"]
    true_centroid_y = attributes["cy"] + shapes.CENTROID_DY_PER_SIZE[shape] * size
    assert np.abs(analysis["centroid"][:, 0] - attributes["cx"]).max() < 1.0
    assert np.abs(analysis["centroid"][:, 1] - true_centroid_y).max() < 1.0
    true_size = np.sqrt(shapes.AREA_PER_SIZE_SQ[shape]) * size
    assert np.abs(analysis["size"] - true_size).max() < 1.5


def test_analyzer_survives_blur_and_noise(dataset, clean_analysis):
    images, captions, _ = dataset
    rng = np.random.default_rng(0)
    degraded = to_uint8(gaussian_blur(images, 1.5) + rng.normal(0.0, 10.0, images.shape))
    sharp, blurred = clean_analysis, shapes_scores.analyze(degraded)
    result = shapes_scores.score_analysis(blurred, captions)
    assert result["color_accuracy"] >= 0.9 and result["shape_accuracy"] >= 0.9
    assert blurred["sharpness"].mean() < 0.6 * sharp["sharpness"].mean()
    assert blurred["edge_band"].mean() > sharp["edge_band"].mean()


def test_float_images_score_like_uint8(dataset):
    images, captions, _ = dataset
    assert shapes_scores.score(images[:50] / 255.0, captions[:50]) == shapes_scores.score(images[:50], captions[:50])


def test_recoloured_shapes_lose_colour_accuracy():
    attributes = shapes.sample_attributes(200, seed=5)
    captions = [shapes.caption(shapes.COLOR_NAMES[c], shapes.SHAPES[s])
                for c, s in zip(attributes["color"], attributes["shape"])]
    recoloured = attributes["color"].copy()
    recoloured[::2] = (recoloured[::2] + 1 + np.arange(100) % 5) % len(shapes.COLOR_NAMES)
    images = shapes.render_batch(**{**attributes, "color": recoloured})
    result = shapes_scores.score(images, captions)
    assert 0.45 <= result["color_accuracy"] <= 0.55
    assert result["shape_accuracy"] >= 0.98
    assert result["joint_accuracy"] == pytest.approx(result["color_accuracy"], abs=0.02)


def test_noise_and_constant_images_have_no_shape(dataset):
    _, captions, _ = dataset
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (100, 64, 64, 3), dtype=np.uint8)
    noise_result = shapes_scores.score(noise, captions[:100])
    assert noise_result["found_rate"] <= 0.1 and noise_result["joint_accuracy"] <= 0.1
    constant = np.full((20, 64, 64, 3), 128, np.uint8)
    analysis = shapes_scores.analyze(constant)
    assert not analysis["found"].any()
    assert (analysis["color"] == -1).all() and (analysis["shape"] == -1).all()
    assert shapes_scores.score(constant, captions[:20])["joint_accuracy"] == 0.0


def test_diversity(dataset):
    images, _, _ = dataset
    identical = np.repeat(images[:1], 8, axis=0)
    same = shapes_scores.diversity([identical, np.repeat(images[1:2], 8, axis=0)])
    assert same["centroid_x_std"] == same["centroid_y_std"] == same["size_std"] == 0.0
    assert same["pairwise_rms"] < 1e-6
    spread = shapes_scores.diversity([images[:30], images[30:60]])
    assert spread["centroid_x_std"] > 3.0 and spread["centroid_y_std"] > 3.0 and spread["size_std"] > 2.0
    assert spread["pairwise_rms"] > 0.1


def test_frechet_formula_on_an_affine_copy():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    moved = 2.0 * features + 1.0
    # Covariances S and 4S: the trace terms give tr S + 4 tr S - 2 * 2 tr S.
    expected = ((features.mean(0) - moved.mean(0)) ** 2).sum() + np.trace(np.cov(features, rowvar=False))
    assert shapes_scores.frechet_distance_from_features(features, moved) == pytest.approx(expected, rel=1e-6)
    assert shapes_scores.frechet_distance_from_features(moved, features) == pytest.approx(expected, rel=1e-6)
    constant = np.ones((50, 5))
    # A singular (zero) covariance still works: only the mean gap and tr S remain.
    expected = ((features.mean(0) - 1.0) ** 2).sum() + np.trace(np.cov(features, rowvar=False))
    assert shapes_scores.frechet_distance_from_features(constant, features) == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_orders_image_sets(dataset, other_dataset):
    images, other = dataset[0], other_dataset[0]
    features, other_features = shapes_scores.frechet_features(images), shapes_scores.frechet_features(other)
    assert np.all((features >= 0.0) & (features <= 1.0))
    fd = shapes_scores.frechet_distance_from_features
    assert fd(features, features) == pytest.approx(0.0, abs=1e-6)
    independent = fd(features, other_features)
    blurred = fd(features, shapes_scores.frechet_features(to_uint8(gaussian_blur(other, 1.5))))
    constant = shapes_scores.frechet_distance(images[:60], np.full_like(other[:60], 90))
    assert independent < 0.2
    assert blurred > 2.5 * independent
    assert constant > 10.0 * independent


def _renders_of(prompt, n, seed, **fixed):
    """n true renders of a caption, its open attributes drawn uniformly (or fixed by keyword)."""
    color, shape = shapes.parse_caption(prompt)
    attributes = shapes.sample_attributes(n, seed, 32)
    for key, value in (("color", color), ("shape", shape)):
        if value is not None:
            attributes[key] = np.full(n, value)
    for key, value in fixed.items():
        attributes[key] = np.full(n, value)
    return shapes.render_batch(**attributes, size_px=32)


def test_coverage_distance_of_true_and_collapsed_generators():
    """True renders of the under-specified prompts cover them (distance near the sampling noise); all of "a
    circle" in red is 5/6 away, all of "a shape" one combination 17/18; fully specified prompts only score
    accuracy, and the accuracies ignore the under-specified prompts."""
    prompts = ["a circle", "a blue shape", "a shape"]
    n = {p: 24 * shapes.open_choices(p) for p in prompts}
    true = np.concatenate([_renders_of(p, n[p], i) for i, p in enumerate(prompts)])
    captions = [p for p in prompts for _ in range(n[p])]
    result = shapes_scores.score(true, captions)
    assert result["open_prompt_accuracy"] == 1.0 and "joint_accuracy" not in result
    noise = np.mean([0.4 * np.sqrt((shapes.open_choices(p) - 1) / n[p]) for p in prompts])
    assert result["coverage_distance"] < 2 * noise, (result, noise)

    collapsed = np.concatenate([_renders_of("a circle", n["a circle"], 7, color=0),
                                _renders_of("a blue shape", n["a blue shape"], 8, shape=1),
                                _renders_of("a shape", n["a shape"], 9, color=2, shape=2)])
    result = shapes_scores.score(collapsed, captions)
    assert result["coverage_distance"] == pytest.approx(np.mean([5 / 6, 2 / 3, 17 / 18]))
    assert result["coverage_by_prompt"] == pytest.approx({"a circle": 5 / 6, "a blue shape": 2 / 3, "a shape": 17 / 18})

    blank = np.full((n["a circle"], 32, 32, 3), 80, np.uint8)  # no shape found: an outcome the truth lacks
    assert shapes_scores.score(blank, ["a circle"] * len(blank))["coverage_distance"] == pytest.approx(1.0)

    mixed = shapes_scores.score(np.concatenate([true[:6], _renders_of("a red square", 6, 3)]),
                          ["a circle"] * 6 + ["a red square"] * 6)
    assert mixed["joint_accuracy"] == 1.0 and "coverage_distance" in mixed
    with pytest.raises(ValueError):
        shapes_scores.coverage_distance(shapes_scores.analyze(true[:6]), ["a red square"] * 6)
