"""SwiftBrush in JAX: image-free one-step distillation of Stable Diffusion."""

__version__ = "0.1.0"
