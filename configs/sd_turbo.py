"""SwiftBrush v2's starting point: student and teachers from SD-Turbo (SD 2.1 architecture).

    python -m swiftbrush_jax.train --config configs/sd_turbo.py --workdir runs/sd_turbo

Configs and options: docs/training.md.
"""

from swiftbrush_jax.config_base import base_config


def get_config():
    c = base_config()
    c.teacher = "stabilityai/sd-turbo"
    c.student_init = "stabilityai/sd-turbo"
    c.prompts = "prompts/journeydb.txt"
    c.total_steps = 250_000
    c.remat = "full"  # memory settings of configs/sd21.py (same architecture)
    c.attention_query_block = 128
    return c
