"""Export a trained student as a complete diffusers ``StableDiffusionPipeline`` (or, from an SDXL teacher,
``StableDiffusionXLPipeline``) folder.

    python -m swiftbrush_jax.export --workdir runs/sd21 --out swiftbrush-sd21 [--step N] [--no-ema]
    python -m swiftbrush_jax.export --workdir runs/v2_b --out v2_b_lora --lora-only   # a LoRA student's adapters

``unet/`` is the student (float32 safetensors, the teacher's UNet config);
``vae/``, ``text_encoder/`` and ``tokenizer/`` (SDXL: and their ``_2`` twins) are copied verbatim from the
teacher; the DDIM scheduler config makes ``num_inference_steps=1`` call the
UNet once at the student's timestep and return its predicted x0 unchanged, so
``pipe(prompt, num_inference_steps=1, guidance_scale=0)`` reproduces
``swiftbrush_jax.sample``. ``--workdir`` and ``--out`` may be local folders or
URLs such as ``gs://bucket/dir`` (``swiftbrush_jax.files.storage``). Everything is
written to a temporary local folder first (``storage.atomic_dir``): a local
``--out`` is that folder renamed, so a failed export leaves no partial
``--out``; on a bucket, which cannot rename, ``model_index.json`` is uploaded
after every other file, so a folder without it is an unfinished export, and
diffusers will not load it.
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .files import diffusers_writer as dio
from .files import storage
from .files.pipeline import SDXL_PIPELINE, SDXL_SECOND, model_index, sdxl_sign
from .errors import ArgumentParser, UsageError, exit_on_user_error
from .models import read_config
from .models.unet import UNetConfig, unet_config_to_diffusers, unet_param_shapes
from .schedule import NoiseSchedule
from .files.student import TrainedStudent, load_trained_student

COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer")


def pipeline_class(teacher_root: str) -> str:
    """The diffusers pipeline class an export of this teacher's student is."""
    return SDXL_PIPELINE if sdxl_sign(teacher_root) else "StableDiffusionPipeline"


def one_step_scheduler_config(schedule: NoiseSchedule, t: int, output_is_x0: bool = False) -> dict:
    """A DDIMScheduler config whose 1-step schedule is [t] and whose final step returns x0 exactly.

    The student's output is read as the teacher's prediction type, or, for a student trained without the
    x0 parameterisation, as ``sample``: x0 itself, which DDIM then returns unchanged.

    ``trailing`` spacing gives [T - 1] at one step (and a sensible spread at
    more); with ``set_alpha_to_one`` the step lands on abar = 1, where DDIM's
    update is 1 * x0 + 0 * eps; ``clip_sample`` off keeps x0 unclipped, as our
    sampler does. ``steps_offset`` is unused by trailing spacing; it is 1
    because StableDiffusionPipeline rewrites any other value with a warning.
    No DDIM config that pipeline accepts reaches another t in one step.
    """
    last = schedule.num_train_timesteps - 1
    if t != last:
        raise UsageError(f"the student was trained at t={t}; a diffusers DDIM pipeline calls a one-step model "
                         f"at t={last} only, so it cannot reproduce this student")
    return schedule.to_ddim_config(timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=True,
                                   clip_sample=False, **({"prediction_type": "sample"} if output_is_x0 else {}))


def teacher_name(student: TrainedStudent) -> str:
    """The teacher as the run was given it: a Hub id, else the folder."""
    return student.record.teacher.get("hub", student.teacher_root)


def model_card(student: TrainedStudent) -> str:
    """A short README.md: what the folder is, how it was made, how to use it."""
    weights = "the EMA of the student's weights" if student.ema else "the raw student weights (no EMA)"
    output = (" and its output is the clean latent x0 itself" if student.record.output_is_x0
              else " and its output turned into the clean latent x0")
    prompts = student.meta["config"].get("prompts")
    trained_on = f" on the prompts `{prompts}`" if prompts else ""
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, swiftbrush, one-step, distillation]
---

# SwiftBrush one-step student

A one-step text-to-image generator distilled from `{teacher_name(student)}` with
SwiftBrush (Nguyen & Tran, CVPR 2024): variational score distillation from the frozen teacher
and a LoRA teacher, trained on prompts only, no images.

- Made with swiftbrush-jax: {student.step} training steps{trained_on}; `unet/` holds {weights}.
- The student is called once at timestep {student.record.t}{output}.
- `vae/`, the text encoders and tokenizers are the teacher's, unchanged; the scheduler is DDIM
  set up so that one step returns the student's x0 exactly.

## Use

```python
from diffusers import {pipeline_class(student.teacher_root)}

pipe = {pipeline_class(student.teacher_root)}.from_pretrained("path/to/this/folder")
image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0).images[0]
```

Use exactly one inference step and `guidance_scale=0`: the student makes an image in one
call, and the teacher's classifier-free guidance is already distilled into it.
"""


def prepare_out(out: str) -> str:
    """The absolute ``--out`` (a URL as given); refuse one that already holds something."""
    out = os.fspath(storage.path(out))
    if storage.isfile(out) or (storage.isdir(out) and storage.listdir(out)):
        raise UsageError(f"--out {out} already exists and is not empty; pick a new folder or remove it")
    return out


def write_pipeline(unet_config, params, components_root: str, scheduler_config: dict, card: str,
                   folder: str) -> None:
    """Every file of an exported pipeline, into an existing empty ``folder``: the UNet, the VAE, text encoders
    and tokenizers of ``components_root`` copied verbatim, the scheduler and a model card. An SDXL teacher's
    model_index.json is kept (its options, such as force_zeros_for_empty_prompt), the scheduler replaced."""
    sdxl = sdxl_sign(components_root) is not None
    dio.write_component(os.path.join(folder, "unet"), unet_config_to_diffusers(unet_config), params, dio.UNET_WEIGHTS)
    dio.copy_components(components_root, folder, COPIED_COMPONENTS + (tuple(SDXL_SECOND.values()) if sdxl else ()))
    dio.write_scheduler(folder, scheduler_config)
    dio.write_model_index(folder, "DDIMScheduler", model_index(components_root) if sdxl else None)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)


def export(workdir: str, out: str, step: Optional[int] = None, ema: bool = True) -> str:
    """Write the pipeline folder ``out`` (local or a URL) from a workdir's checkpoint; returns its absolute path."""
    out = prepare_out(out)
    student = load_trained_student(workdir, step, ema)
    scheduler_config = one_step_scheduler_config(NoiseSchedule.from_folder(student.teacher_root), student.record.t,
                                                 student.record.output_is_x0)
    with storage.atomic_dir(out, written_last="model_index.json") as folder:
        write_pipeline(student.unet.config, student.params, student.teacher_root, scheduler_config,
                       model_card(student), folder)
    return out


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def export_lora(workdir: str, out: str, step: Optional[int] = None, ema: bool = True) -> str:
    """A LoRA student's adapters alone, for diffusers' ``load_lora_weights`` on the teacher, with the one-step
    scheduler beside them; returns the absolute ``out``."""
    from .files.checkpoint import load_student
    from .lora import lora_scale, to_diffusers_lora
    from .files.student import StudentRecord, resolve_teacher
    from .files.weights import save_state_dict

    out = prepare_out(out)
    adapters, meta, step = load_student(workdir, step, ema)
    record = StudentRecord.from_meta(meta, f"{workdir} step {step}")
    if not record.lora:
        raise UsageError(f"{workdir}: its student is a whole UNet, not a LoRA (student_lora.rank was 0); "
                         f"export it without --lora-only")
    teacher_root = resolve_teacher(record.teacher, workdir)
    scheduler_config = one_step_scheduler_config(NoiseSchedule.from_folder(teacher_root), record.t, record.output_is_x0)
    teacher_shapes = unet_param_shapes(UNetConfig.from_diffusers(read_config(os.path.join(teacher_root, "unet"))))
    state = to_diffusers_lora(adapters, teacher_shapes, lora_scale(record.lora["rank"], record.lora["alpha"]))
    with storage.atomic_dir(out, written_last=LORA_WEIGHTS) as folder:
        dio.write_scheduler(folder, scheduler_config)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(lora_card(teacher_root if "hub" not in record.teacher else record.teacher["hub"],
                              pipeline_class(teacher_root)))
        save_state_dict(state, os.path.join(folder, LORA_WEIGHTS))
    return out


def lora_card(teacher: str, pipeline: str) -> str:
    return f"""---
library_name: diffusers
tags: [stable-diffusion, swiftbrush, one-step, distillation, lora]
---

# SwiftBrush one-step LoRA student

Adapters that turn `{teacher}` into a one-step generator (a LoRA student of swiftbrush-jax).

```python
from diffusers import DDIMScheduler, {pipeline}

pipe = {pipeline}.from_pretrained("{teacher}")
pipe.scheduler = DDIMScheduler.from_pretrained("path/to/this/folder", subfolder="scheduler")
pipe.load_lora_weights("path/to/this/folder")
image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0).images[0]
```
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser("python -m swiftbrush_jax.export", __doc__)
    parser.add_argument("--workdir", required=True, help="training workdir with checkpoints/ (a local folder or a URL such as gs://bucket/run)")
    parser.add_argument("--out", required=True, help="new (or empty) folder for the diffusers pipeline (local or a URL)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw student instead of its EMA")
    parser.add_argument("--lora-only", action="store_true",
                        help="a LoRA student's adapters alone (for diffusers' load_lora_weights on the teacher)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's restore notices are not for this tool's user
    write = export_lora if args.lora_only else export
    out = write(args.workdir, args.out, args.step, not args.no_ema)
    what = "LoRA adapters" if args.lora_only else "student"
    print(f"exported {'EMA ' if not args.no_ema else ''}{what} of {args.workdir} to {out}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
