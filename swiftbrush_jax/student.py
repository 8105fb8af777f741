"""The trained student of a workdir, paired with the teacher it was distilled from.

A checkpoint holds only the student's parameters; its architecture, VAE, text
encoder, tokenizer and noise schedule are the teacher's, found through the
``teacher_root`` recorded in the checkpoint metadata. Sampling and export
both start here, so both refuse the same broken workdirs with the same words.
"""

import dataclasses
import os
from typing import Any, Optional

import numpy as np
from flax import traverse_util

from .checkpoint import CheckpointError, load_student
from .models import read_config
from .models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
from .pipeline import PipelineError


@dataclasses.dataclass
class TrainedStudent:
    """Student (or EMA) parameters of one checkpoint, with the UNet module they run in."""

    params: Any
    unet: UNet2DConditionModel
    step: int
    ema: bool
    t: int  # the one timestep the student is called at
    teacher_root: str
    meta: dict


def _check_shapes(params, config: UNetConfig, where: str) -> None:
    """The checkpoint's parameter tree must be exactly the one the teacher's config builds."""
    expected = {".".join(p): tuple(s.shape) for p, s in traverse_util.flatten_dict(unet_param_shapes(config)).items()}
    got = {".".join(p): tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(params).items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{len(names)} {what} (e.g. {names[0]})"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "mis-shaped")) if names]
        raise CheckpointError(f"{where}: the student parameters do not fit the teacher's unet/config.json "
                              f"({'; '.join(parts)})")


def load_trained_student(workdir: str, step: Optional[int] = None, ema: bool = True) -> TrainedStudent:
    """The newest (or ``step``) checkpoint's EMA (or raw) student, checked against its teacher."""
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{workdir}: no such folder; pass a training workdir")
    params, meta, step = load_student(workdir, step, ema)
    teacher_root = meta.get("teacher_root")
    if not teacher_root or not os.path.isdir(os.path.join(teacher_root, "unet")):
        raise PipelineError(f"{workdir}: the teacher folder recorded in its checkpoint ({teacher_root}) is gone; "
                            "the VAE, text encoder and tokenizer are read from it")
    config = UNetConfig.from_diffusers(read_config(os.path.join(teacher_root, "unet")))
    _check_shapes(params, config, f"{workdir} step {step}")
    return TrainedStudent(params=params, unet=UNet2DConditionModel(config), step=step, ema=ema,
                          t=int(meta["student_t"]), teacher_root=teacher_root, meta=meta)
