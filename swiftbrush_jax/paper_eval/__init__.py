"""Evaluating like the papers: COCO-2014 FID and CLIP score, and the HPSv2 benchmark (docs/method.md §6, §7).

One file per concern: ``prompts`` (the prompt sets), ``generation`` (resumable
PNGs with a manifest), ``fid`` (clean-fid's protocol), ``clip_models`` (the
OpenCLIP ViTs of the CLIP score and HPSv2), ``table`` (records and the paper
rows), ``cli`` (the command line, also ``python -m swiftbrush_jax.evaluate
--suite coco2014|hps``).
"""

from ..evaluators.paper_suites import main

__all__ = ["main"]
