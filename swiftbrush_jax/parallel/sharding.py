"""Device mesh and the rule table that decides how each array is laid out on it.

Batches are split over every device (``data`` x ``fsdp``). Parameters,
EMA and optimizer moments are sharded over ``fsdp`` along one dimension chosen
by the first matching rule; small arrays stay replicated, since splitting them
buys no memory and costs a collective.
"""

import re
from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH = (DATA, FSDP)

# (regex on the '/'-joined path, which dimension to shard over fsdp). First match wins.
# "largest" picks the largest dimension divisible by the fsdp size; None replicates.
FSDP_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    (r"(kernel|embedding|down|up)$", "largest"),
    (r".*", None),
)
MIN_SHARD_SIZE = 2**14


class ShardingError(ValueError):
    """A mesh or batch size that does not fit the devices; the message says how to fix it."""


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp) mesh; -1 for ``data`` takes every device left over by ``fsdp``."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ShardingError(f"mesh fsdp={fsdp} does not divide the {n} devices; pick a divisor of {n}")
        data = n // fsdp
    if data * fsdp != n:
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} != {n} devices; set --config.mesh.data=-1")
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(path: str, shape: Tuple[int, ...], fsdp: int, rules=FSDP_RULES, min_size=MIN_SHARD_SIZE) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for pattern, how in rules:
        if re.search(pattern, path):
            if how is None:
                return P()
            dims = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0]
            if not dims:
                return P()
            spec = [None] * len(shape)
            spec[dims[0]] = FSDP
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, rules=FSDP_RULES, min_size=MIN_SHARD_SIZE):
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs) by the rule table."""
    fsdp = mesh.shape[FSDP]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), tuple(x.shape), fsdp, rules, min_size)),
        tree,
    )


def is_abstract(tree) -> bool:
    """Whether ``tree`` holds ShapeDtypeStructs (a plan's stand-ins) rather than arrays."""
    return isinstance(jax.tree_util.tree_leaves(tree)[0], jax.ShapeDtypeStruct)


def place(tree, shardings):
    """``tree`` on the mesh in ``shardings``: host arrays are copied there, each device receiving only its
    shard; ShapeDtypeStructs (planning) become ShapeDtypeStructs that carry the sharding."""
    def one(x, s):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.device_put(x, s)

    return jax.tree_util.tree_map(one, tree, shardings)


def bytes_per_device(tree) -> int:
    """The bytes one device holds of ``tree`` (placed arrays or ShapeDtypeStructs with shardings); the rule
    table splits evenly, so every device of the mesh holds as many."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def shard_batch(x):
    """``x`` with its leading (batch) dimension split over the ambient mesh, as the batch itself is.

    Models call this on their activations: without it XLA may lay an activation
    out like the FSDP-sharded weight it meets (split over heads or channels) and
    reshard back and forth. Outside ``with jax.sharding.use_abstract_mesh(...)``
    (or when the batch does not divide over the devices) it returns ``x``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names) or x.shape[0] % (mesh.shape[DATA] * mesh.shape[FSDP]):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
    n = mesh.size
    if global_batch % n:
        raise ShardingError(
            f"batch_size={global_batch} is not divisible by the {n} devices; "
            f"use a multiple of {n}, e.g. --config.batch_size={max(n, global_batch - global_batch % n)}"
        )
    if microbatches < 1 or (global_batch // n) % microbatches:
        raise ShardingError(
            f"microbatches={microbatches} does not divide the per-device batch {global_batch // n} "
            f"(batch_size={global_batch} over {n} devices); use a divisor of {global_batch // n}"
        )


def global_batch_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This host's rows of a batch as one global array split over the mesh's batch axes."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def host_local(tree):
    """Replicated global arrays as numpy, read from this process's own copy.

    Converting a multi-process array directly gathers it across processes (a
    collective every process would have to join); a replicated one needs no
    gather, since every process already holds the whole value.
    """
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)
