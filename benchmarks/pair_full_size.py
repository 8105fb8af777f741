"""The pair pass at full SD 2.1 size: the guided difference e_lora - e_teacher in bf16, against float32.

    XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" \
        python benchmarks/pair_full_size.py --json benchmarks/results/pair_full_size.json

The problem is benchmarks/bf16_vsd_gradients.py's ``--size sd21`` one (a SD 2.1-base UNet with random
weights, rank-64 LoRA on to_q/to_v with up-matrices N(0, p^2), random 77 x 1024 text states, 8x8 latents,
batch 1, CFG 4.5 for both), at a random x_t and timestep: the reference subtracts the two guided scores in
float32 at ``highest``; the pair pass (``pair.guided_difference``) runs the UNet in bf16 from bf16 weights;
beside it, the same subtraction in bf16. One compile per variant, every p through the same program.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bf16_vsd_gradients import PERTURBATIONS, compare, peak_rss_gib, perturbed_lora, random_params  # noqa: E402
from harness import hardware, write_json  # noqa: E402
from pipelines import training_config  # noqa: E402

from swiftbrush_jax import pair  # noqa: E402
from swiftbrush_jax.generate import guided  # noqa: E402
from swiftbrush_jax.lora import init_lora, lora_scale  # noqa: E402
from swiftbrush_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes  # noqa: E402
from swiftbrush_jax.models.presets import UNET


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.time()
    config = training_config("sd21")
    unet_config = UNetConfig.from_diffusers(UNET)
    scale = lora_scale(config.lora.rank, config.lora.alpha)
    unet32 = UNet2DConditionModel(unet_config, lora_scale=scale)
    unet16 = unet32.clone(dtype=jnp.bfloat16)
    params = random_params(unet_param_shapes(unet_config), args.seed)
    lora = init_lora(jax.random.PRNGKey(args.seed), params, config.lora.rank, tuple(config.lora.targets))
    keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), 4)
    x = jax.random.normal(keys[0], (1, args.latent, args.latent, 4))
    t = jax.random.randint(keys[1], (1,), 20, 981)
    cond, uncond = jax.random.normal(keys[2], (1, 77, 1024)), jax.random.normal(keys[3], (1, 77, 1024))
    g = config.vsd.guidance_scale

    def subtracted(unet, p, adapters):
        teacher = guided(unet, {"params": p}, x, t, cond, uncond, g)
        return guided(unet, {"params": p, "lora": adapters}, x, t, cond, uncond, g) - teacher

    with jax.default_matmul_precision("highest"):
        reference_fn = jax.jit(lambda p, a: subtracted(unet32, p, a))
    params16 = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), params)
    del params
    pair_fn = jax.jit(lambda p, a: pair.guided_difference(unet16, p, a, x, t, cond, uncond, g, g)[1])
    bf16_fn = jax.jit(lambda p, a: subtracted(unet16, p, a))
    results = {}
    for p in PERTURBATIONS:
        adapters = perturbed_lora(lora, p, args.seed + 2)
        with jax.default_matmul_precision("highest"):
            reference = reference_fn(jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), params16), adapters)
        results[str(p)] = {"pair_bf16": compare(pair_fn(params16, adapters), reference),
                           "subtracted_bf16": compare(bf16_fn(params16, adapters), reference)}
        print(f"p={p}: pair bf16 cosine {results[str(p)]['pair_bf16']['cosine']:.4f}, subtracted bf16 "
              f"{results[str(p)]['subtracted_bf16']['cosine']:.4f} (peak RSS {peak_rss_gib():.1f} GiB, "
              f"{time.time() - start:.0f} s)", flush=True)
    if args.json:
        write_json(args.json, {"benchmark": "pair_full_size", "latent": args.latent, "batch": 1, "t": int(t[0]),
                               "guidance_scale": g, "reference": "float32 weights (the bf16 ones, cast), highest",
                               "by_p": results, "seconds": time.time() - start, "hardware": hardware()})


if __name__ == "__main__":
    main()
