"""Images/s of one SwiftBrush train step: our jitted VSD step against the same step in PyTorch.

    python benchmarks/train_step.py [--sizes tiny shapes] [--torch-compile] [--json out.json]
    python benchmarks/train_step.py --sd21-shapes          # GPU machines: random SD 2.1 weights

Both sides load the same pipeline folder (``pipelines.py``) and run the same
algorithm (docs/method.md §3) with the size's training config (batch, LoRA rank, CFG,
dtypes) on the same machine, one after the other. Ours is the trainer's step (``setup.build_vsd``,
``VSD.jit_train_step``) on one device; PyTorch's is ``torch_vsd.TorchVSDStep``
(diffusers UNet, plain LoRA on to_q/to_v), eager and optionally
``torch.compile``d. Timings are per step after warm-up, each step waited for.
"""

import argparse
import os
import tempfile

import jax
import numpy as np
import torch

from harness import describe, format_table, hardware, limit_threads, time_steady, write_json
from pipelines import SIZES, pipeline_folder, training_config
from torch_vsd import TorchVSDStep
from swiftbrush_jax.parallel import sharding
from swiftbrush_jax import setup
from swiftbrush_jax.files.pipeline import load_pipeline
from swiftbrush_jax.toy.shapes import all_prompts
from swiftbrush_jax.vsd import VSDConfig


def prompt_ids(pipe, batch: int) -> np.ndarray:
    prompts = list(all_prompts())
    return pipe.tokenize([prompts[i % len(prompts)] for i in range(batch)])


def jax_step(pipe, config, ids):
    """Our step as the trainer sets it up, on one device; returns a blocking no-argument callable."""
    vsd = setup.build_vsd(config, pipe)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    frozen, frozen_sh = setup.frozen_inputs(config, pipe, mesh)
    state, state_sh = setup.initial_state(config, vsd, pipe.unet_params, mesh)
    step = vsd.jit_train_step(state_sh, frozen_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    ids = jax.device_put(ids, sharding.batch_sharding(mesh))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], frozen, ids)
        jax.block_until_ready((holder["state"], metrics))

    return run


def torch_step(folder, pipe, config, ids, compile_modules: bool):
    """The PyTorch step on the same weights; returns a blocking no-argument callable."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    h, w, c = setup.build_vsd(config, pipe).latent_shape
    step = TorchVSDStep(
        unet, text, pipe.schedule.alphas_cumprod, latent_shape=(c, h, w), rank=config.lora.rank,
        alpha=config.lora.alpha, vsd=VSDConfig(**config.vsd), student_lr=config.student_optimizer.lr,
        lora_lr=config.lora_optimizer.lr, device=device, compute_dtype=getattr(torch, config.teacher_dtype),
        compile_modules=compile_modules)
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    uncond_t = torch.as_tensor(pipe.tokenize([""]), dtype=torch.long, device=device)

    def run():
        step(ids_t, uncond_t)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def bench_size(size: str, root: str, batch, budget_s: float, with_compile: bool) -> dict:
    folder = pipeline_folder(size, root)
    pipe = load_pipeline(folder, components=("unet", "text_encoder", "tokenizer", "scheduler"))
    config = training_config(size)
    config.batch_size = batch = batch or config.batch_size
    ids = prompt_ids(pipe, batch)
    row = {"size": size, "batch": batch, "dtype": config.teacher_dtype}
    runs = {"ours": lambda: jax_step(pipe, config, ids), "torch": lambda: torch_step(folder, pipe, config, ids, False)}
    if with_compile:
        runs["torch_compile"] = lambda: torch_step(folder, pipe, config, ids, True)
    for name, make in runs.items():
        timing = time_steady(make(), budget_s=budget_s)
        row[f"{name}_img_s"] = batch / timing["median_s"]
        row[f"{name}_first_s"] = timing["first_s"]
        row[f"{name}_iters"] = timing["iters"]
        print(f"{size} {name}: {row[f'{name}_img_s']:.2f} images/s (median of {timing['iters']}, "
              f"first call {timing['first_s']:.1f} s)", flush=True)
    row["ratio"] = row["ours_img_s"] / row["torch_img_s"]
    if with_compile:
        row["ratio_vs_compile"] = row["ours_img_s"] / row["torch_compile_img_s"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "shapes"], choices=SIZES)
    parser.add_argument("--sd21-shapes", action="store_true", help="run only SD 2.1-base shapes (random weights)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default: the size's training config)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per measurement")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd modules")
    parser.add_argument("--workdir", default=None, help="where the random pipelines are written (default: temp)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: all cores)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    limit_threads(args.threads)
    sizes = ["sd21"] if args.sd21_shapes else args.sizes

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        rows = [bench_size(s, root, args.batch, args.seconds, args.torch_compile) for s in sizes]
    hw = hardware()
    columns = ["size", "batch", "dtype", "ours_img_s", "torch_img_s", "ratio"]
    if args.torch_compile:
        columns += ["torch_compile_img_s", "ratio_vs_compile"]
    print(format_table(rows, columns))
    print(f"hardware: {describe(hw)}")
    if args.json:
        write_json(args.json, {"benchmark": "train_step", "hardware": hw, "rows": rows})


if __name__ == "__main__":
    main()
