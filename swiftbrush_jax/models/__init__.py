"""Flax ports of the diffusers/transformers modules that Stable Diffusion uses.

All image tensors are NHWC inside these modules; param names mirror the
diffusers module paths (the Flax module named ``down_blocks.0`` is diffusers' ``down_blocks.0``)
so that ``swiftbrush_jax.weights`` converts by rule, not by table.
"""
