"""FID by clean-fid's protocol (Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN Evaluation").

docs/method.md §7: generated and reference images are centre-cropped to a square and
resized to 256 px (PIL Lanczos, the papers' resolution for COCO FID), then
clean-fid's "clean" mode takes over: each channel is resized to 299 px as a
float image with PIL bicubic (no 8-bit rounding, no aliasing), scaled to
[-1, 1] by (x - 128) / 128, and fed to the TorchScript Inception of
StyleGAN2-ADA (``inception-2015-12-05.pt``, TensorFlow's FID Inception), whose
2048-d pool features give each set's mean and covariance. The reference
statistics of a COCO folder are computed once and cached in an .npz.

clean-fid itself is not imported: it needs torchvision, which has no wheel for
the pinned CPU torch on PyPI. The steps above are its ``build_resizer("clean")``
and ``InceptionV3W`` with ``resize_inside=False``; the tests compare against
them wherever clean-fid is installed.
"""

import os
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import UsageError

INCEPTION_FILE = "inception-2015-12-05.pt"
PAPER_SIZE = 256  # images are brought to 256 px before clean-fid's own resize (docs/method.md §7)
INCEPTION_SIZE = 299
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def center_crop_resize(image: np.ndarray, size: int = PAPER_SIZE) -> np.ndarray:
    """The largest centred square of a uint8 HWC image, resized to size x size with PIL Lanczos (uint8)."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.LANCZOS) if side != size else square)


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float32 PIL image, bicubic, clipped to [0, 255]."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize(
        (size, size), Image.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.float32)


def inception_input(image: np.ndarray) -> np.ndarray:
    """A uint8 HWC image as the Inception sees it: 256 px crop-resize, clean 299 px resize, CHW float 0..255."""
    return clean_resize(center_crop_resize(image)).transpose(2, 0, 1)


class InceptionFeatures:
    """clean-fid's Inception (TorchScript) from a local file: 2048-d features of 299 px float images."""

    def __init__(self, path: str):
        import torch

        if not path:
            raise UsageError(f"FID: no Inception weights given; pass --inception PATH to {INCEPTION_FILE} "
                             "(clean-fid's TorchScript Inception)")
        if not os.path.isfile(path):
            raise UsageError(f"FID: --inception {path}: no such file (need {INCEPTION_FILE})")
        try:
            # A TorchScript archive: its code and tensors, read by TorchScript's loader (docs/evaluation.md).
            module = torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:
            raise UsageError(f"FID: --inception {path} is not a TorchScript file ({e})") from None
        if not hasattr(module, "layers"):
            raise UsageError(f"FID: --inception {path} has no `layers` submodule; it is not {INCEPTION_FILE}")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.layers = module.layers.to(self.device)

    def __call__(self, batch) -> np.ndarray:
        """(n, 3, 299, 299) float tensor in [0, 255] -> (n, 2048) float32 pool features."""
        import torch

        with torch.no_grad():
            scaled = (batch.to(self.device) - 128) / 128
            return self.layers(scaled).reshape(batch.shape[0], -1).cpu().numpy()


def image_files(folder: str, what: str) -> List[str]:
    """Sorted .jpg/.jpeg/.png paths directly inside folder; an unusable folder is a user error."""
    if not folder:
        raise UsageError(f"{what}: no image folder given")
    if not os.path.isdir(folder):
        raise UsageError(f"{what}: {folder}: no such folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UsageError(f"{what}: {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


class _ImageFiles:
    """A torch Dataset of image files as Inception inputs (a class, so DataLoader workers can pickle it)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return inception_input(np.asarray(image.convert("RGB")))


def file_features(paths: Sequence[str], extractor: InceptionFeatures, batch_size: int, workers: int,
                  desc: str) -> np.ndarray:
    """(n, 2048) Inception features of image files, decoded and resized in DataLoader workers."""
    import torch
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=workers)
    return np.concatenate([extractor(batch) for batch in tqdm(loader, desc=desc, unit="batch")])


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, numpy's) covariance of (n, d) features, float64, as clean-fid computes them."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise UsageError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians (Dowson & Landau).

    The matrix square root of the (non-symmetric) product is scipy's; when the
    product is singular enough to make it non-finite, eps is added to both
    diagonals, and a numerically imaginary part is dropped, as clean-fid does.
    """
    from scipy import linalg

    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def reference_statistics(folder: str, cache: str, extractor: InceptionFeatures, batch_size: int,
                         workers: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, image count) of a reference folder, read from the .npz cache or computed and cached there."""
    if os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as stats:
            mu, sigma, count = stats["mu"], stats["sigma"], int(stats["count"])
        if folder and len(image_files(folder, "FID reference (--coco-images)")) != count:
            raise UsageError(f"--fid-stats {cache} holds the statistics of {count} images, but {folder} has another "
                             "number; delete the cache or pass another --fid-stats")
        return mu, sigma, count
    paths = image_files(folder, "FID reference (--coco-images)")
    mu, sigma = statistics(file_features(paths, extractor, batch_size, workers, "reference features"))
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    partial = cache + ".partial.npz"
    np.savez(partial, mu=mu, sigma=sigma, count=len(paths), folder=os.path.abspath(folder))
    os.replace(partial, cache)
    return mu, sigma, len(paths)
