"""Our SDXL UNet against diffusers' at full SDXL base 1.0 size: random weights, small latents, float32, CPU.

    python benchmarks/sdxl_unet_parity.py --json benchmarks/results/sdxl_unet_parity.json

Both float32 copies (10.3 GB each) do not fit a 24 GiB machine beside each other, so the two run one after the
other: diffusers' UNet (models.presets.SDXL_UNET, diffusers' own initialisation, seeded) computes its output
and is saved as safetensors shards, freed, and our loader reads those shards into our UNet, which computes on
the same inputs. Run it alone, under a memory watchdog (peak about 21 GiB).
"""

import argparse
import gc
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bf16_vsd_gradients import peak_rss_gib  # noqa: E402
from harness import hardware, write_json  # noqa: E402

from swiftbrush_jax.models.presets import SDXL_UNET  # noqa: E402


def inputs(latent: int, seed: int) -> dict:
    """Latents, a timestep, a 77-token context of both encoders' width, a pooled embedding and the time ids of
    the latents' pixel size."""
    rng = np.random.default_rng(seed)
    px = 8 * latent
    return {"x": rng.standard_normal((1, latent, latent, 4)).astype(np.float32), "t": np.array([501]),
            "context": rng.standard_normal((1, 77, SDXL_UNET["cross_attention_dim"])).astype(np.float32),
            "text_embeds": rng.standard_normal((1, 1280)).astype(np.float32),
            "time_ids": np.array([[px, px, 0, 0, px, px]], np.float32)}


def diffusers_output(folder: str, batch: dict, seed: int) -> tuple:
    """(diffusers' output NHWC, parameter count, seconds); the model is saved to ``folder`` and freed."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    start = time.time()
    model = UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items() if not k.startswith("_")}).eval()
    count = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(torch.from_numpy(batch["x"].transpose(0, 3, 1, 2)), torch.from_numpy(batch["t"]),
                    torch.from_numpy(batch["context"]),
                    added_cond_kwargs={"text_embeds": torch.from_numpy(batch["text_embeds"]),
                                       "time_ids": torch.from_numpy(batch["time_ids"])}).sample
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="1GB")
    del model
    gc.collect()
    return out.numpy().transpose(0, 2, 3, 1), count, time.time() - start


def our_output(folder: str, batch: dict) -> tuple:
    import jax

    from swiftbrush_jax.models.unet import load_unet

    start = time.time()
    model, params = load_unet(folder)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b["x"], b["t"], b["context"],
                                               text_embeds=b["text_embeds"], time_ids=b["time_ids"]))
    return np.asarray(forward(params, batch)), time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batch = inputs(args.latent, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        expected, count, torch_s = diffusers_output(folder, batch, args.seed)
        ours, ours_s = our_output(folder, batch)
    diff = np.abs(ours - expected)
    result = {"parameters": count, "latent": args.latent, "max_abs_diff": float(diff.max()),
              "mean_abs_diff": float(diff.mean()), "max_abs_reference": float(np.abs(expected).max()),
              "relative_to_max": float(diff.max() / np.abs(expected).max()),
              "diffusers_s": torch_s, "ours_s": ours_s, "peak_rss_gib": peak_rss_gib(), "hardware": hardware()}
    print({k: v for k, v in result.items() if k != "hardware"})
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
