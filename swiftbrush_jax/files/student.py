"""The trained student of a workdir, and the record that says how to run it.

A checkpoint holds only the student's parameters. Everything else needed to
turn them into images is the checkpoint's ``student`` record: where the
teacher is (its VAE, text encoder, tokenizer and schedule are the student's
too), the timestep the student is called at, whether its output is x0 itself
or a prediction to convert (docs/method.md §3), the teacher's prediction type
and the latent size. The trainer's sampler, ``sample``, ``export`` and
``evaluate`` all read it here, so a workdir copied to another machine runs
there as it ran where it was trained.
"""

import dataclasses
import os
from typing import Any, Optional

import numpy as np
from flax import traverse_util

from . import storage
from .checkpoint import CheckpointError, load_student
from ..lora import fold, lora_scale
from ..models import read_config
from ..models.unet import UNet2DConditionModel, UNetConfig, load_unet, unet_param_shapes
from .pipeline import PipelineError, resolve

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # swiftbrush_jax/


def _inside(path: str, folder: str) -> bool:
    if storage.is_remote(path) or storage.is_remote(folder):
        path, folder = str(storage.path(path)).rstrip("/"), str(storage.path(folder)).rstrip("/")
        return path == folder or path.startswith(folder + "/")
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _relative(path: str, folder: str) -> str:
    if storage.is_remote(path):
        return str(storage.path(path))[len(str(storage.path(folder)).rstrip("/")) + 1:]
    return os.path.relpath(os.path.realpath(path), os.path.realpath(folder))


def teacher_reference(source: str, workdir: str) -> dict:
    """Where the teacher is, in a form that survives moving the workdir or the installed package.

    A folder inside the workdir (the tiny smoke-test teacher, also on a bucket) or inside this package (the
    shapes teacher) is recorded relative to it; another local folder by its absolute path, a bucket
    folder by its URL; anything else is a Hub id, found again in the Hub or its offline cache."""
    if storage.isdir(source):
        if _inside(source, workdir):
            return {"workdir": _relative(source, workdir)}
        if _inside(source, PACKAGE_DIR):
            return {"package": _relative(source, PACKAGE_DIR)}
        return {"url": source} if storage.is_remote(source) else {"folder": os.path.abspath(source)}
    return {"hub": source}


def resolve_teacher(reference: dict, workdir: str) -> str:
    """The local folder of a recorded teacher (a Hub id or a URL is fetched, or found in its local cache)."""
    (kind, where), = reference.items()
    if kind in ("hub", "url"):
        return resolve(where)
    folder = {"workdir": lambda: storage.join(workdir, where), "package": lambda: os.path.join(PACKAGE_DIR, where),
              "folder": lambda: where}[kind]()
    if not storage.isdir(storage.join(folder, "unet")):
        raise PipelineError(f"{workdir}: its teacher ({kind} {where}) is not at {folder}; the VAE, text encoder "
                            "and tokenizer are read from it: put the teacher's diffusers folder back there")
    return resolve(folder)


@dataclasses.dataclass(frozen=True)
class StudentRecord:
    """How to run a checkpoint's student (saved as the checkpoint metadata's ``student`` entry)."""

    teacher: dict  # teacher_reference()
    t: int  # the one timestep the student is called at
    output_is_x0: bool  # the no-x0 ablation: the output is the sample itself, not a prediction to convert
    prediction_type: str  # the teacher's, which the student's output follows otherwise
    latent_size: int  # the side of the noise the student was trained on
    lora: Optional[dict] = None  # a LoRA student: {"rank", "alpha", "targets"}, its adapters over the teacher

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict, where: str) -> "StudentRecord":
        record = meta.get("student")
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(record, dict) or not names - {"lora"} <= set(record) <= names:
            raise CheckpointError(f"{where}: its metadata has no complete student record (it was written by an "
                                  "older swiftbrush-jax); sample or export it with the version that trained it")
        return cls(**record)


def record_for_run(config, vsd, teacher_source: str, workdir: str) -> StudentRecord:
    """The record of a run's student, from its config and step (``vsd.VSD``)."""
    lora = ({"rank": int(config.student_lora.rank), "alpha": float(config.student_lora.alpha),
             "targets": list(config.student_lora.targets)} if vsd.lora_student else None)
    return StudentRecord(teacher=teacher_reference(teacher_source, workdir), t=vsd.student_t,
                         output_is_x0=not vsd.config.student_x0_parameterization,
                         prediction_type=vsd.schedule.prediction_type, latent_size=int(vsd.latent_shape[0]),
                         lora=lora)


@dataclasses.dataclass
class TrainedStudent:
    """Student (or EMA) parameters of one checkpoint, with the UNet module they run in and their record."""

    params: Any
    unet: UNet2DConditionModel
    step: int
    ema: bool
    record: StudentRecord
    teacher_root: str  # the teacher's local folder, resolved from the record
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
    if not storage.isdir(workdir):
        raise CheckpointError(f"{workdir}: no such folder; pass a training workdir")
    params, meta, step = load_student(workdir, step, ema)
    where = f"{workdir} step {step}"
    record = StudentRecord.from_meta(meta, where)
    teacher_root = resolve_teacher(record.teacher, workdir)
    from ..schedule import NoiseSchedule

    teacher_prediction = NoiseSchedule.from_folder(teacher_root).prediction_type
    if teacher_prediction != record.prediction_type:
        raise CheckpointError(f"{where}: trained with a {record.prediction_type} teacher, but the teacher found at "
                              f"{teacher_root} predicts {teacher_prediction}; point it at the original teacher")
    config = UNetConfig.from_diffusers(read_config(os.path.join(teacher_root, "unet")))
    if record.lora:  # the student's adapters merged into the teacher's weights
        _, teacher_params = load_unet(os.path.join(teacher_root, "unet"))
        params = fold(teacher_params, params, lora_scale(record.lora["rank"], record.lora["alpha"]))
    _check_shapes(params, config, where)
    return TrainedStudent(params=params, unet=UNet2DConditionModel(config), step=step, ema=ema, record=record,
                          teacher_root=teacher_root, meta=meta)
