"""Merge two one-step students by interpolating their weights, into an exported diffusers folder.

    python -m swiftbrush_jax.merge --weight 0.5 --out merged runs/student_a runs/student_b

SwiftBrush v2 (docs/method.md §6) ends by averaging two students trained
differently from one teacher: theta = (1 - w) theta_A + w theta_B, every UNet
weight alike. A and B may each be a training workdir (its newest checkpoint's
EMA student, or --step / --no-ema) or a folder written by
``swiftbrush_jax.export``. They must share the UNet architecture and the
one-step scheduler; the merged folder takes A's VAE, text encoder and
tokenizer (the teacher's, for a student distilled from it) and loads in
diffusers like any export. ``--out`` may be a local folder or a URL; it is
written atomically as ``export`` writes.
"""

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

from .files import storage
from .errors import ArgumentParser, UsageError, exit_on_user_error
from .export import one_step_scheduler_config, pipeline_class, prepare_out, write_pipeline
from .models.unet import UNetConfig, load_unet
from .sample import is_workdir
from .schedule import NoiseSchedule
from .files.student import load_trained_student


@dataclasses.dataclass
class OneStepStudent:
    """A student's UNet weights with what an export needs around them."""

    source: str
    unet_config: UNetConfig
    params: Any
    components_root: str  # holds vae/, text_encoder/, tokenizer/
    scheduler_config: dict


def is_export(folder: str) -> bool:
    return storage.isfile(storage.join(folder, "model_index.json")) and storage.isdir(storage.join(folder, "unet"))


def load_one_step_student(source: str, step: Optional[int] = None, ema: bool = True) -> OneStepStudent:
    """A workdir's trained student or an exported one-step folder."""
    if is_workdir(source):
        student = load_trained_student(source, step, ema)
        scheduler = one_step_scheduler_config(NoiseSchedule.from_folder(student.teacher_root), student.record.t,
                                              student.record.output_is_x0)
        return OneStepStudent(source, student.unet.config, student.params, student.teacher_root, scheduler)
    if is_export(source):
        folder = storage.local_copy(source, "model_index.json")
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            scheduler = json.load(f)
        if not (scheduler.get("timestep_spacing") == "trailing" and scheduler.get("set_alpha_to_one")):
            raise UsageError(f"{source}: its scheduler is not a one-step student's (an export of "
                             f"swiftbrush_jax.export); merge students, not teachers")
        unet, params = load_unet(os.path.join(folder, "unet"))
        return OneStepStudent(source, unet.config, params, folder, scheduler)
    raise UsageError(f"{source}: neither a training workdir (no checkpoints/) nor an exported student folder "
                     f"(no model_index.json and unet/)")


def interpolate(a, b, weight: float):
    """(1 - weight) a + weight b, leaf by leaf, in float32."""
    mix = lambda x, y: ((1.0 - weight) * np.asarray(x, np.float32) + weight * np.asarray(y, np.float32))
    return jax.tree_util.tree_map(mix, a, b)


def merge(source_a: str, source_b: str, weight: float, out: str, step_a: Optional[int] = None,
          step_b: Optional[int] = None, ema: bool = True) -> str:
    """Write the merged student to ``out``; returns its absolute path."""
    if not np.isfinite(weight):
        raise UsageError(f"--weight {weight}: use a finite number (0.5: the average; 0: A, 1: B)")
    out = prepare_out(out)
    a = load_one_step_student(source_a, step_a, ema)
    b = load_one_step_student(source_b, step_b, ema)
    if a.unet_config != b.unet_config:
        raise UsageError(f"{source_a} and {source_b} have different UNet configs; only students of one "
                         f"architecture can be merged")
    if a.scheduler_config != b.scheduler_config:
        raise UsageError(f"{source_a} and {source_b} are run at different timesteps or prediction types "
                         f"(their one-step schedulers differ); merge students of one teacher")
    params = interpolate(a.params, b.params, weight)
    card = model_card(source_a, source_b, weight, pipeline_class(a.components_root))
    with storage.atomic_dir(out, written_last="model_index.json") as folder:
        write_pipeline(a.unet_config, params, a.components_root, a.scheduler_config, card, folder)
    return out


def model_card(source_a: str, source_b: str, weight: float, pipeline: str) -> str:
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, swiftbrush, one-step, distillation, merge]
---

# Merged SwiftBrush one-step student

The UNet is (1 - {weight:g}) x `{source_a}` + {weight:g} x `{source_b}`, weight by weight, as
SwiftBrush v2 merges its two students; `vae/`, the text encoders and tokenizers are A's.
Made with swiftbrush-jax (`python -m swiftbrush_jax.merge`).

```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("path/to/this/folder")
image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0).images[0]
```
"""


def parse_args(argv: Sequence[str]):
    parser = ArgumentParser("python -m swiftbrush_jax.merge", __doc__)
    parser.add_argument("a", help="student A: a training workdir or an exported folder (local or a URL)")
    parser.add_argument("b", help="student B, likewise")
    parser.add_argument("--weight", type=float, default=0.5, help="B's share: (1 - w) A + w B (default 0.5)")
    parser.add_argument("--out", required=True, help="new (or empty) folder for the merged diffusers pipeline")
    parser.add_argument("--step-a", type=int, help="A's checkpoint step, for a workdir (default: newest)")
    parser.add_argument("--step-b", type=int, help="B's checkpoint step, for a workdir (default: newest)")
    parser.add_argument("--no-ema", action="store_true", help="merge the workdirs' raw students, not their EMAs")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    out = merge(args.a, args.b, args.weight, args.out, args.step_a, args.step_b, not args.no_ema)
    print(f"merged {args.a} and {args.b} (weight {args.weight:g}) into {out}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
