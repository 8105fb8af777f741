"""Everything a first GPU (or TPU) run should measure, in one command and one JSON, within about 8 minutes.

    python benchmarks/accelerator_suite.py --json benchmarks/results/accelerator_suite_<device>.json
    python benchmarks/accelerator_suite.py --tiny --json /tmp/suite.json     # the CPU path the test suite runs

At SD 2.1-base shapes (random weights written with diffusers, 512 px, configs/sd21.py's recipe and dtypes):
1. the train step in images/s at the largest per-device batch that fits (tried from --batches down), for
   the all-bf16 step (``score_dtype=""``), the old default (float32 scores at ``highest``) and the default
   (float32 scores at ``tensorfloat32``: TF32 on NVIDIA GPUs, 3-pass bf16 on TPUs), and the default with
   cuDNN's attention kernel on a GPU; each with MFU (plan's model FLOPs over the device's dense bf16 peak)
   and the device's peak memory;
2. one-step 512 px generation at batch 1 and 8, ours (bf16) against diffusers' StableDiffusionPipeline in
   fp16 on the same device.
Every part has its own time budget; a part that does not fit the remaining time is recorded as skipped,
and the JSON is rewritten after each part, so a run cut short keeps what it measured.
"""

import argparse
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import hardware, time_steady, write_json  # noqa: E402
from pipelines import pipeline_folder, training_config  # noqa: E402

from swiftbrush_jax import plan, precision  # noqa: E402
from swiftbrush_jax.files.pipeline import load_pipeline

# Dense bf16 peak FLOP/s by device kind (datasheets), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5 lite": 197e12,
             "TPU v5p": 459e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}
VARIANTS = {
    "all_bf16": {"score_dtype": ""},
    "old_default_highest": {"score_precision": "highest"},
    "default": {},
    "default_cudnn_attention": {"attention_implementation": "cudnn"},
}


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((flops for name, flops in PEAK_BF16.items() if name in kind), None)


def peak_memory_bytes(device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def step_for(pipe, config, batch: int):
    """The trainer's step as ``plan`` lowers it, on real (random) weights: a blocking no-argument callable."""
    from swiftbrush_jax.parallel import sharding
    from swiftbrush_jax import setup

    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    vsd = setup.build_vsd(config, pipe)
    frozen, frozen_sh = setup.frozen_inputs(config, pipe, mesh)
    state, state_sh = setup.initial_state(config, vsd, pipe.unet_params, mesh)
    step = vsd.jit_train_step(state_sh, frozen_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    prompts = ["a photo of a cat", "a painting of a lighthouse at dusk"]
    ids = jax.device_put(pipe.tokenize([prompts[i % 2] for i in range(batch)]), sharding.batch_sharding(mesh))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], frozen, ids)
        jax.block_until_ready((holder["state"], metrics))

    return run


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def train_rows(pipe, base, variants, batches, seconds: float, deadline: float) -> list:
    rows, batch = [], None
    device = jax.devices()[0]
    for name in variants:
        overrides = VARIANTS[name]
        if name.endswith("cudnn_attention") and jax.default_backend() != "gpu":
            rows.append({"variant": name, "skipped": "cuDNN attention needs an NVIDIA GPU"})
            continue
        if time.time() > deadline:
            rows.append({"variant": name, "skipped": "out of time"})
            continue
        config = base.copy_and_resolve_references()
        for key, value in overrides.items():
            config[key] = value
        candidates = [batch] if batch else list(batches)
        for candidate in candidates:
            try:
                timing = time_steady(step_for(pipe, config, candidate), warmup=1, min_iters=2, budget_s=seconds)
            except Exception as e:  # noqa: BLE001  a batch too large for the device: try the next one
                if not out_of_memory(e):
                    raise
                print(f"{name}: batch {candidate} does not fit", flush=True)
                continue
            batch = candidate
            images_s = candidate / timing["median_s"]
            flops = plan.model_flops(config, pipe, candidate)
            peak = peak_flops(device)
            rows.append({"variant": name, "batch": candidate, "images_s": images_s, "first_call_s": timing["first_s"],
                         "model_flops": flops, "mfu": flops / timing["median_s"] / peak if peak else None,
                         "score_matmuls": precision.score_matmuls(config.score_precision, jax.default_backend()),
                         "peak_memory_bytes": peak_memory_bytes(device)})
            print(f"{name}: batch {candidate}, {images_s:.2f} images/s", flush=True)
            break
        else:
            rows.append({"variant": name, "skipped": f"no batch of {candidates} fits"})
    return rows


def inference_rows(folder: str, tiny: bool, batches, seconds: float) -> list:
    import jax.numpy as jnp
    import torch
    from inference import diffusers_one_step, ours, prompts_of

    jax_dtype, torch_dtype = (jnp.float32, torch.float32) if tiny else (jnp.bfloat16, torch.float16)
    runners = {"ours": ours(folder, jax_dtype), "diffusers": diffusers_one_step(folder, torch_dtype)}
    rows = []
    for batch in batches:
        row = {"batch": batch, "ours_dtype": jnp.dtype(jax_dtype).name, "diffusers_dtype": str(torch_dtype)}
        for name, run in runners.items():
            row[f"{name}_ms"] = 1e3 * time_steady(lambda: run(prompts_of(batch)), budget_s=seconds)["median_s"]
        row["speedup"] = row["diffusers_ms"] / row["ours_ms"]
        rows.append(row)
        print(f"one step, batch {batch}: ours {row['ours_ms']:.1f} ms, diffusers {row['diffusers_ms']:.1f} ms",
              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random pipeline (CPU check of the suite)")
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 8, 4, 2, 1],
                        help="per-device train batches to try, largest first")
    parser.add_argument("--seconds", type=float, default=15.0, help="timing budget per measurement")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no new train variant starts after this")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--one-step-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--workdir", default=None, help="where the random pipeline is written (default: temp)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    start = time.time()
    size = "tiny" if args.tiny else "sd21"
    result = {"benchmark": "accelerator_suite", "size": size, "hardware": hardware()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pipeline_folder(size, args.workdir or tmp)
        result["pipeline_s"] = time.time() - start
        pipe = load_pipeline(folder, components=("unet", "text_encoder", "tokenizer", "scheduler"))
        config = training_config("sd21")
        config.teacher, config.sample_every = folder, 0
        if args.tiny:
            config.lora.rank, config.lora.alpha = 4, 8.0
        result["train_step"] = train_rows(pipe, config, args.variants, args.batches, args.seconds, start + args.budget_s)
        write_json(args.json, result)
        result["one_step"] = inference_rows(folder, args.tiny, args.one_step_batches, args.seconds)
    result["wall_s"] = time.time() - start
    write_json(args.json, result)
    print(f"wrote {args.json} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
