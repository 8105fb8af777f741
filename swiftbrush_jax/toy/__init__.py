"""Toy text-to-image world: a procedural caption-image dataset small enough to train a real teacher on a CPU."""
