"""One-step generation latency, prompts to pixels: ours (one jitted function) against diffusers.

    python benchmarks/inference.py [--batches 1 8] [--json out.json]
    python benchmarks/inference.py --sd21-shapes       # GPU machines: random SD 2.1 weights, bfloat16

Both load the same random-weight pipeline folder. Ours tokenizes, then runs
text encoder, one UNet call at t = T-1 (x0 parameterisation) and the VAE
decoder in one jitted call, and copies the images to host memory. diffusers
runs ``StableDiffusionPipeline`` with a trailing-spacing DDIM scheduler,
``num_inference_steps=1`` and ``guidance_scale=0`` (one UNet call, no CFG),
``output_type="np"``. Each timing is one call after warm-up, waited for.
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch

from harness import describe, format_table, hardware, limit_threads, time_steady, write_json
from pipelines import pipeline_folder
from swiftbrush_jax.generate import decode_to_pixels, one_step_x0
from swiftbrush_jax.files.pipeline import load_pipeline
from swiftbrush_jax.toy.shapes import all_prompts


def prompts_of(batch: int) -> list:
    prompts = list(all_prompts())
    return [prompts[i % len(prompts)] for i in range(batch)]


def ours(folder: str, dtype):
    """A (prompts -> numpy images) callable around one jitted text-encode, UNet, decode function."""
    pipe = load_pipeline(folder, dtype=dtype, param_dtype=dtype)
    t = pipe.schedule.num_train_timesteps - 1
    side = pipe.unet.config.sample_size
    latent = (side, side, pipe.unet.config.in_channels)

    @jax.jit
    def generate(text_params, unet_params, vae_params, ids, rng):
        cond = pipe.text_encoder.apply({"params": text_params}, ids)
        z = jax.random.normal(rng, (ids.shape[0],) + latent)
        x0 = one_step_x0(pipe.unet, {"params": unet_params}, z, cond, pipe.schedule, t)
        return decode_to_pixels(pipe.vae, vae_params, x0)

    rng = jax.random.PRNGKey(0)
    return lambda prompts: np.asarray(generate(pipe.text_params, pipe.unet_params, pipe.vae_params,
                                               jnp.asarray(pipe.tokenize(prompts)), rng))


def diffusers_one_step(folder: str, dtype: torch.dtype):
    """A (prompts -> numpy images) callable around diffusers' StableDiffusionPipeline, one DDIM step."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from swiftbrush_jax.schedule import NoiseSchedule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scheduler = DDIMScheduler.from_config(NoiseSchedule.from_folder(folder).to_ddim_config(timestep_spacing="trailing"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler=scheduler, safety_checker=None,
                                                   requires_safety_checker=False, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def run(prompts):
        images = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, output_type="np",
                      generator=torch.Generator(device).manual_seed(0)).images
        if device.type == "cuda":
            torch.cuda.synchronize()
        return images

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd21-shapes", action="store_true", help="SD 2.1-base shapes, random weights, bfloat16")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per measurement")
    parser.add_argument("--workdir", default=None, help="where the random pipeline is written (default: temp)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: all cores)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    limit_threads(args.threads)
    size = "sd21" if args.sd21_shapes else "tiny"
    jax_dtype, torch_dtype = (jnp.bfloat16, torch.bfloat16) if args.sd21_shapes else (jnp.float32, torch.float32)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pipeline_folder(size, args.workdir or tmp)
        runners = {"ours": ours(folder, jax_dtype), "diffusers": diffusers_one_step(folder, torch_dtype)}
        for batch in args.batches:
            prompts = prompts_of(batch)
            row = {"size": size, "batch": batch, "dtype": str(torch_dtype).replace("torch.", "")}
            for name, run in runners.items():
                timing = time_steady(lambda: run(prompts), budget_s=args.seconds)
                row[f"{name}_ms"] = 1e3 * timing["median_s"]
                row[f"{name}_first_s"] = timing["first_s"]
                print(f"{size} batch {batch} {name}: {row[f'{name}_ms']:.1f} ms (median of {timing['iters']})",
                      flush=True)
            row["speedup"] = row["diffusers_ms"] / row["ours_ms"]
            rows.append(row)
    hw = hardware()
    print(format_table(rows, ["size", "batch", "dtype", "ours_ms", "diffusers_ms", "speedup"]))
    print(f"hardware: {describe(hw)}")
    if args.json:
        write_json(args.json, {"benchmark": "inference", "hardware": hw, "rows": rows})


if __name__ == "__main__":
    main()
