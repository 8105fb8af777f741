"""A smoke run on a CPU: a tiny random SD-shaped teacher made on the fly, a few steps.

    python -m swiftbrush_jax.train --config configs/tiny.py --workdir runs/tiny
"""

from swiftbrush_jax.config_base import base_config


def get_config():
    c = base_config()
    c.make_tiny_teacher = True
    c.prompts = "shapes"
    c.validation_prompts = ("a red circle", "a blue square")
    c.batch_size = 4
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.sample_every = 10
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.teacher_dtype = "float32"
    c.student_compute_dtype = "float32"
    return c
