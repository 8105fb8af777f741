"""Orbax checkpoints of the train state, with the metadata needed to resume safely.

Each checkpoint holds the ``TrainState`` (student, EMA, LoRA, both optimizer
states, step, RNG) and a JSON record: the prompt-stream position, the whole
config of the run, and how to run the student (``student.StudentRecord``). The
frozen teacher is never written: it is re-read from its source on resume. A
resumed run may change the keys of ``CHANGEABLE_ON_RESUME``; any other change is
refused with the keys named, and nothing is moved.

A checkpoint is only ever trusted once it reads back bit for bit: the JSON
record carries a checksum of every array, and resuming verifies them. One that
fails is moved aside (never deleted) and the previous one is used instead.
"""

import fnmatch
import json
import os
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ..parallel import distributed
from .. import precision
from . import storage

# Config keys a resumed run may change: they steer the loop, logging, memory use and the learning-rate
# schedule, not what the state holds or how it was made. The prompt source may be renamed or moved: the
# prompts themselves are checked by their digest. Every other key is fixed for the life of a workdir.
CHANGEABLE_ON_RESUME = (
    "prompts", "prompt_column", "validation_prompts", "total_steps", "log_every", "checkpoint_every",
    "keep_checkpoints", "sample_every", "max_consecutive_skips", "mesh.*", "remat", "attention_query_block",
    "attention_implementation", "peer_timeout_s", "sample_grid_min_px",
    "microbatches", "vsd.lora_updates_per_step", "teacher_dtype", "student_compute_dtype", "score_dtype", "score_precision",
    "score_matmuls", "score_pair",
    "*_optimizer.lr", "*_optimizer.warmup_steps", "*_optimizer.decay_steps", "*_optimizer.weight_decay",
    "*_optimizer.clip",
)


class CheckpointError(ValueError):
    """A workdir whose checkpoints cannot be used by this run; the message says why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (full disk, lost mount); the ones already written are untouched."""


class CorruptCheckpoint(Exception):
    """A checkpoint that does not read back as it was written (truncated, overwritten, half deleted)."""


def config_record(config) -> dict:
    """The whole config as {dotted key: JSON value}, as a checkpoint records it, with ``score_matmuls``: what
    score_precision runs as on this backend, so that a run resumed on another backend says what changed."""
    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    record = json.loads(json.dumps(dict(flat(config.to_dict()))))
    if "score_precision" in record:
        record["score_matmuls"] = precision.score_matmuls(record["score_precision"], jax.default_backend())
    return record


def changeable_on_resume(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in CHANGEABLE_ON_RESUME)


def config_changes(saved: dict, config) -> tuple:
    """(changes a resumed run may make, changes it may not), each a list of "key: old -> new" lines."""
    now = config_record(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
    describe = lambda k: f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
    return ([describe(k) for k in changed if changeable_on_resume(k)],
            [describe(k) for k in changed if not changeable_on_resume(k)])


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager. Unfinished writes (``<step>.orbax-checkpoint-tmp-*`` left by a
    killed or failed save) are removed, as they are never complete. Old checkpoints are only deleted
    by ``max_to_keep`` after a newer one has been committed."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)


def checkpoints_dir(workdir: str) -> str:
    """The workdir's ``checkpoints`` folder: a local one made absolute, a URL (``gs://...``) as given."""
    return os.fspath(storage.path(workdir) / "checkpoints")


def first_line(error: Exception) -> str:
    """An exception as one short line (tensorstore appends a many-line spec dump)."""
    text = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore")[0][:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Start writing checkpoint ``step`` (asynchronously if the manager is); ``meta`` gains the state's checksums."""
    meta = {**meta, "checksums": checksums(state)}
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax/tensorstore raise many types for a failed write (ENOSPC, EIO, ...)
        raise write_error(mngr, e) from None


def finish(mngr: ocp.CheckpointManager) -> None:
    """Wait for the last asynchronous write; a failed one is a CheckpointWriteError."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # see save()
        raise write_error(mngr, e) from None


def ensure_space(mngr: ocp.CheckpointManager, state, step: int) -> None:
    """Refuse to start checkpoint ``step`` where it cannot fit. A write that runs out of space midway
    leaves the earlier checkpoints intact too, but fails deep in orbax's threads, with pages of tracebacks."""
    finish(mngr)  # the previous write, and the deletions that follow it, change the free space
    directory = str(mngr.directory)
    free = storage.free_bytes(directory)
    if free is None:  # an object store has no free-space figure
        return
    need = sum(shard.data.nbytes for x in jax.tree_util.tree_leaves(state)
               for shard in x.addressable_shards if shard.replica_id == 0)
    if need + need // 20 + 2**20 > free:
        raise CheckpointWriteError(f"could not write checkpoint {step} to {directory} (it needs about "
                                   f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free); {_intact(mngr)}")


def write_error(mngr: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
    """The one-line report of a failed write: its OS-level cause (tensorstore buries it deep in the message)."""
    code = getattr(error, "errno", None) or re.search(r"os_error_code='(\d+)'", str(error))
    cause = os.strerror(int(code if isinstance(code, int) else code.group(1))) if code else first_line(error)
    return CheckpointWriteError(f"could not write a checkpoint to {mngr.directory} ({cause}); {_intact(mngr)}")


def _intact(mngr: ocp.CheckpointManager) -> str:
    """What is left after a failed write: the newest checkpoint complete on disk, and how to go on."""
    mngr.reload()
    complete = mngr.all_steps()
    newest = f"step {max(complete)}" if complete else "none yet"
    return (f"the checkpoints already there are intact (newest: {newest}); "
            "fix the cause (e.g. free disk space) and rerun to resume")


_UINT_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _odd_weights(shape: tuple) -> jax.Array:
    """2 * (row-major flat index) + 1, mod 2**32, built without a reshape so sharded arrays stay put."""
    strides = np.cumprod((1,) + shape[:0:-1])[::-1] if shape else ()
    index = sum((jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(int(s) % 2**32)
                 for d, s in enumerate(strides)), jnp.zeros(shape, jnp.uint32))
    return 2 * index + 1


def _tree_checksums(tree):
    """Per array: the sum of its raw bits times odd position weights, mod 2**32. Odd weights make any single
    changed value change the sum, and moved values change it too. Weights are built once per shape, as
    tracing a few ops for each of thousands of arrays is most of the cost."""
    weights = {}

    def checksum(x):
        if x.shape not in weights:
            weights[x.shape] = _odd_weights(x.shape)
        bits = jax.lax.bitcast_convert_type(x, _UINT_OF_WIDTH[x.dtype.itemsize]).astype(jnp.uint32)
        return jnp.sum(bits * weights[x.shape], dtype=jnp.uint32)

    return jax.tree_util.tree_map(checksum, tree)


_checksum_tree = jax.jit(_tree_checksums)


def checksums(state) -> dict:
    """{array path: checksum} of a train state, computed where the arrays live."""
    sums = jax.device_get(_checksum_tree(state))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): int(v)
            for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, to restore straight onto the mesh."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore(mngr: ocp.CheckpointManager, step: int, target) -> tuple:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return out.state, out.meta


def check_compatible(meta: dict, config, step: int, directory: str) -> list:
    """The changes this run makes to checkpoint ``step``'s config, where all are allowed on resume;
    else a CheckpointError naming the ones that are not."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {step} in {directory} records no config (an older swiftbrush-jax wrote "
                              "it); resume it with that version, or use a new --workdir")
    allowed, refused = config_changes(saved, config)
    if refused:
        raise CheckpointError(f"checkpoint {step} in {directory} was made with another config, and these keys cannot "
                              f"change mid-run: {'; '.join(refused)}; resume with the checkpoint's values or use a "
                              f"new --workdir (keys that may change: {', '.join(CHANGEABLE_ON_RESUME)})")
    return allowed


def restore_newest_good(mngr: ocp.CheckpointManager, target, config, aside: str,
                        warn: Callable[[str], None]) -> tuple:
    """(state, meta, step) from the newest checkpoint that reads back intact.

    A damaged checkpoint is reported through ``warn``, moved to ``aside/<step>`` and the previous one is
    tried. A checkpoint of an incompatible config is a CheckpointError: the workdir is wrong, not damaged.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            state, meta = _restore_verified(mngr, step, target, config, warn)
        except CorruptCheckpoint as e:
            moved = move_aside(mngr, step, aside)
            warn(f"warning: checkpoint {step} is damaged ({e}); moved it to {moved}, trying the previous one")
            continue
        return state, meta, step
    raise CheckpointError(f"none of the checkpoints {sorted(steps)} in {mngr.directory} could be read; "
                          f"they were moved to {aside}; rerun to start afresh, or restore them from a backup")


def _restore_verified(mngr: ocp.CheckpointManager, step: int, target, config, warn: Callable[[str], None]) -> tuple:
    """Checkpoint ``step`` after checking its config and every array's checksum."""
    try:
        meta = read_meta(mngr, step)
    except Exception as e:  # a missing, truncated or garbled JSON record
        raise CorruptCheckpoint(f"its metadata is unreadable: {first_line(e)}") from None
    allowed = check_compatible(meta, config, step, str(mngr.directory))
    if allowed:
        warn(f"resuming step {step} with changed settings: {'; '.join(allowed)}")
    state, error = None, None
    try:
        state, meta = restore(mngr, step, target)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        error = first_line(e)
    if not _on_every_process(error is None):
        raise CorruptCheckpoint(f"its arrays are unreadable: {error or 'on another process'}")
    expected = meta.get("checksums")
    if expected is not None:
        bad = sorted(name for name, value in checksums(state).items() if expected.get(name) != value)
        if bad:
            raise CorruptCheckpoint(f"{len(bad)} arrays differ from their saved checksums, e.g. {bad[0]}")
    return state, meta


def _on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on all processes, so that they all take the same branch."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def move_aside(mngr: ocp.CheckpointManager, step: int, aside: str) -> str:
    """Move checkpoint ``step`` out of the manager's reach (so neither a new save of that step nor
    ``max_to_keep`` touches it) into a fresh ``aside/<step>[.n]``; returns where it went.

    On an object store the move is a copy then a deletion: a run killed in between leaves the checkpoint
    in both places, and the next run finds it damaged again and moves it to the next free ``.n``."""
    dest = storage.join(aside, str(step))
    n = 0
    while storage.exists(dest):
        n += 1
        dest = storage.join(aside, f"{step}.{n}")
    if jax.process_index() == 0:
        storage.move_tree(storage.join(str(mngr.directory), str(step)), dest)
    distributed.barrier(f"checkpoint {step} moved aside")
    mngr.reload()
    return dest


def read_on_one_device(directory: str, step: int) -> tuple:
    """(state as nested dicts, meta) of one checkpoint, every array on this process's first device.

    The target comes from the checkpoint's own metadata, so a checkpoint written
    by any mesh or number of processes (a pod run) reads back on one machine.
    """
    mngr = ocp.CheckpointManager(storage.path(directory),
                                 options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = mngr.item_metadata(step)["state"]
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return out.state, out.meta


def load_student(workdir: str, step: Optional[int] = None, ema: bool = True) -> tuple:
    """(student or EMA params, meta, step) from a training workdir, on this process's first device."""
    directory = checkpoints_dir(workdir)
    if not storage.isdir(directory):
        raise CheckpointError(f"{workdir} has no checkpoints/ folder; is it a training workdir?")
    steps = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True)
                                  ).all_steps()
    if not steps:
        raise CheckpointError(f"{directory} holds no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{directory} has no checkpoint for step {step}; available: {sorted(steps)}")
    try:
        state, meta = read_on_one_device(directory, step)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        raise CheckpointError(f"{directory}/{step} could not be read ({first_line(e)})") from None
    return state["ema" if ema else "student"], meta, step
