"""Toy text-to-image world: a procedural caption-image dataset small enough to train a real teacher on a CPU."""

import os

TEACHER_FOLDER = "teacher"


def teacher_path() -> str:
    """The shipped shapes teacher: a diffusers Stable Diffusion folder (see toy.make_teacher)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), TEACHER_FOLDER)
