"""Procedural "shapes" dataset: one filled, anti-aliased shape on a varied grey background.

Every image answers its caption ("a red circle") exactly, and colour and
shape are chosen so that an analytic analyzer (swiftbrush_jax.evaluators.shapes_scores) can
read them back even from blurred, noisy generations: six saturated colours
60 degrees of hue apart on backgrounds that stay dark-to-mid grey, and three
shapes whose areas and outlines differ clearly at equal bounding box.

Captions may also leave attributes open: "a circle" (any colour), "a red
shape" (any shape), "a shape" (anything). The images that answer such a
caption draw the open attributes uniformly, so a generator that covers the
world gives each colour 1/6 of its "a circle" images; the evaluation's
coverage_distance measures how far it is from that.

Geometry, in pixel units with pixel (i, j) centred at (j + 0.5, i + 0.5):
`size` is the half-extent of the shape's bounding box, which is centred on
(cx, cy). The circle has radius `size`, the square half-side `size`, the
triangle points up with its apex at (cx, cy - size) and its base on
y = cy + size from cx - size to cx + size.
"""

import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

# Saturated RGB colours, one per 60 degrees of hue, so that blur (which mixes
# in the grey background and lowers saturation) never moves one onto another.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 210, 40),
    "green": (40, 190, 60),
    "cyan": (40, 200, 210),
    "blue": (50, 80, 230),
    "magenta": (210, 50, 210),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
COLOR_RGB = np.array([COLORS[name] for name in COLOR_NAMES], np.float32)

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# Area of each shape divided by size**2, and the vertical offset of its
# centroid from the bounding-box centre divided by size: what the analyzer
# needs to place a template of a given area on a measured centroid.
AREA_PER_SIZE_SQ = np.array([np.pi, 4.0, 2.0])
CENTROID_DY_PER_SIZE = np.array([0.0, 0.0, 1.0 / 3.0])

# Sampling ranges, at a 64 px image; lengths and slopes scale with image size.
REFERENCE_PX = 64
SIZE_RANGE = (10.0, 22.0)
EDGE_MARGIN = 2.0
GRAY_RANGE = (25.0, 100.0)
TINT_MAX = 8.0
SLOPE_MAX = 20.0


class Background(NamedTuple):
    """A grey level, a small per-channel tint and a linear gradient.

    The value of channel c at (x, y) is
    gray + tint[c] + slope[0] * (x / W - 0.5) + slope[1] * (y / H - 0.5),
    in 0..255 units; kept at most about 130 so every colour stands out.
    """

    gray: float
    tint: Tuple[float, float, float]
    slope: Tuple[float, float]


OPEN_WORD = "shape"  # stands for the shape when a caption leaves it open: "a red shape", "a shape"


def caption(color: Optional[str], shape: Optional[str]) -> str:
    """The caption of an image holding one `color` `shape`; an attribute given as None is left open.

    "a red circle", "a circle" (any colour), "a red shape" (any shape), "a shape" (anything).
    """
    if (color is not None and color not in COLORS) or (shape is not None and shape not in SHAPES):
        raise ValueError(f"unknown colour or shape: {color!r}, {shape!r}")
    return " ".join(["a"] + ([color] if color else []) + [shape or OPEN_WORD])


def specified_prompts() -> List[str]:
    """The 18 fully specified captions, colour-major."""
    return [caption(color, shape) for color in COLOR_NAMES for shape in SHAPES]


def open_prompts() -> List[str]:
    """The 10 under-specified captions: "a <shape>" (colour open), "a <colour> shape" (shape open), "a shape"."""
    return ([caption(None, shape) for shape in SHAPES] + [caption(color, None) for color in COLOR_NAMES]
            + [caption(None, None)])


def all_prompts() -> List[str]:
    """The world's vocabulary: the fully specified captions, then the under-specified ones."""
    return specified_prompts() + open_prompts()


def captions_of(color: np.ndarray, shape: np.ndarray, keep_color: np.ndarray, keep_shape: np.ndarray) -> List[str]:
    """Captions of images with these colour and shape indices, naming each attribute only where keep_* is set."""
    return [caption(COLOR_NAMES[c] if kc else None, SHAPES[s] if ks else None)
            for c, s, kc, ks in zip(color, shape, keep_color, keep_shape)]


_CAPTION_RE = re.compile(r"^\s*an?\s+(?:(\w+)\s+)?(\w+)\s*$", re.IGNORECASE)


def parse_caption(text: str) -> Tuple[Optional[int], Optional[int]]:
    """(colour index, shape index) named by a caption "a [<colour>] <shape>|shape"; None where left open."""
    match = _CAPTION_RE.match(text)
    if not match:
        raise ValueError(f"not a shapes caption: {text!r}")
    color, shape = (match.group(1) or "").lower() or None, match.group(2).lower()
    if (color is not None and color not in COLORS) or (shape != OPEN_WORD and shape not in SHAPES):
        raise ValueError(f"unknown colour or shape in caption: {text!r}")
    return (None if color is None else COLOR_NAMES.index(color),
            None if shape == OPEN_WORD else SHAPES.index(shape))


def open_choices(prompt: str) -> int:
    """How many (colour, shape) combinations answer a caption: 1 when fully specified, 18 for "a shape"."""
    color, shape = parse_caption(prompt)
    return (len(COLOR_NAMES) if color is None else 1) * (len(SHAPES) if shape is None else 1)


def pixel_centres(size_px: int) -> np.ndarray:
    """Coordinates of the pixel centres along one axis."""
    return np.arange(size_px, dtype=np.float32) + 0.5


def shape_coverage(shape: int, x, y, cx, cy, size) -> np.ndarray:
    """Fraction of each pixel covered by a shape (one-pixel anti-aliasing ramp).

    Uses a signed distance (negative inside); all arguments broadcast, so one
    call renders a whole batch. For the square and the triangle the distance
    is the max over edges, exact inside and near enough outside for a ramp
    half a pixel wide.
    """
    dx, dy = x - cx, y - cy
    if SHAPES[shape] == "circle":
        signed = np.sqrt(dx * dx + dy * dy) - size
    elif SHAPES[shape] == "square":
        signed = np.maximum(np.abs(dx), np.abs(dy)) - size
    else:
        below_apex = dy + size
        sides = (2.0 * np.abs(dx) - below_apex) / np.sqrt(5.0)
        signed = np.maximum(dy - size, sides)
    return np.clip(0.5 - signed, 0.0, 1.0)


def render_batch(color, shape, cx, cy, size, gray, tint, slope, size_px: int = REFERENCE_PX) -> np.ndarray:
    """Render n images at once; per-image arrays of length n (tint, slope: (n, 3), (n, 2)).

    color and shape are indices into COLOR_NAMES and SHAPES. Returns uint8 (n, H, W, 3).
    """
    color, shape = np.asarray(color), np.asarray(shape)
    per_image = [np.asarray(a, np.float32)[:, None, None] for a in (cx, cy, size, gray)]
    cx, cy, size, gray = per_image
    tint = np.asarray(tint, np.float32)[:, None, None, :]
    slope = np.asarray(slope, np.float32)
    axis = pixel_centres(size_px)
    x, y = axis[None, None, :], axis[None, :, None]
    ramp = slope[:, 0, None, None] * (x / size_px - 0.5) + slope[:, 1, None, None] * (y / size_px - 0.5)
    background = gray[..., None] + tint + ramp[..., None]
    alpha = np.zeros(background.shape[:3], np.float32)
    for index in range(len(SHAPES)):
        alpha = np.where((shape == index)[:, None, None], shape_coverage(index, x, y, cx, cy, size), alpha)
    alpha = alpha[..., None]
    foreground = COLOR_RGB[color][:, None, None, :]
    image = background * (1.0 - alpha) + foreground * alpha
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render(color: str, shape: str, cx: float, cy: float, size: float, background: Background,
           size_px: int = REFERENCE_PX) -> np.ndarray:
    """One image, uint8 (H, W, 3), of a `color` `shape` of half-extent `size` centred at (cx, cy)."""
    return render_batch(
        [COLOR_NAMES.index(color)], [SHAPES.index(shape)], [cx], [cy], [size],
        [background.gray], [background.tint], [background.slope], size_px)[0]


def sample_attributes(n: int, seed: int, size_px: int = REFERENCE_PX) -> Dict[str, np.ndarray]:
    """Random colour, shape, placement and background of n images, deterministic from the seed.

    The shape always lies fully inside the image with a small margin.
    """
    rng = np.random.default_rng(seed)
    scale = size_px / REFERENCE_PX
    size = rng.uniform(*SIZE_RANGE, n) * scale
    low = size + EDGE_MARGIN * scale
    high = size_px - low
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    magnitude = rng.uniform(0.0, SLOPE_MAX, n)
    return {
        "color": rng.integers(0, len(COLOR_NAMES), n),
        "shape": rng.integers(0, len(SHAPES), n),
        "cx": rng.uniform(low, high),
        "cy": rng.uniform(low, high),
        "size": size,
        "gray": rng.uniform(*GRAY_RANGE, n),
        "tint": rng.uniform(-TINT_MAX, TINT_MAX, (n, 3)),
        "slope": magnitude[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1),
    }


def sample_dataset(n: int, seed: int, size_px: int = REFERENCE_PX):
    """n random images with captions: (uint8 (n, H, W, 3), list of captions, attributes).

    The attributes dict holds the arrays the images were rendered from
    (color and shape as vocabulary indices); everything is a function of seed.
    """
    attributes = sample_attributes(n, seed, size_px)
    images = render_batch(**attributes, size_px=size_px)
    captions = [caption(COLOR_NAMES[c], SHAPES[s]) for c, s in zip(attributes["color"], attributes["shape"])]
    return images, captions, attributes
