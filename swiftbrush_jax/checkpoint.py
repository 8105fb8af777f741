"""Orbax checkpoints of the train state, with the metadata needed to resume safely.

Each checkpoint holds the ``TrainState`` (student, EMA, LoRA, both optimizer
states, step, RNG) and a JSON record: the prompt-stream position and a
fingerprint of the config keys that shape the state. The frozen teacher is
never written: it is re-read from its source on resume.
"""

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

# Config keys whose change makes an old checkpoint meaningless for a new run.
FINGERPRINT_KEYS = ("teacher", "student_init", "lora.rank", "lora.alpha", "lora.targets", "seed", "prompts")


class CheckpointError(ValueError):
    """A workdir whose checkpoints cannot be used by this run; the message says why."""


def fingerprint(config) -> dict:
    out = {}
    for key in FINGERPRINT_KEYS:
        value = config
        for part in key.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, to restore straight onto the mesh."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore(mngr: ocp.CheckpointManager, step: int, target) -> tuple:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return out.state, out.meta


def check_compatible(saved: dict, config) -> None:
    now = fingerprint(config)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if diff:
        raise CheckpointError("the workdir holds checkpoints of an incompatible config (" + "; ".join(diff)
                              + "); use a new --workdir or the original config")


def latest_step(mngr: ocp.CheckpointManager) -> Optional[int]:
    return mngr.latest_step()


def load_student(workdir: str, step: Optional[int] = None, ema: bool = True) -> tuple:
    """(student or EMA params, meta, step) from a training workdir, on the default device.

    The state is restored without a target, as nested dicts of arrays; only
    the wanted tree is kept.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{workdir} has no checkpoints/ folder; is it a training workdir?")
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{directory} holds no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{directory} has no checkpoint for step {step}; available: {sorted(steps)}")
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        raise CheckpointError(f"{directory}/{step} could not be read ({type(e).__name__}: {e})") from None
    params = out.state["ema" if ema else "student"]
    return params, out.meta, step
