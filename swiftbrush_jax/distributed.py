"""Multi-host start-up: explicit coordinator flags, or auto-detection on TPU pods and SLURM."""

import os

import jax
from absl import flags

_COORDINATOR = "coordinator_address"


def define_flags() -> None:
    flags.DEFINE_string(_COORDINATOR, None, "host:port of process 0 (multi-host runs without auto-detection).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def _cluster_detected() -> bool:
    """Environments where ``jax.distributed.initialize()`` finds the cluster by itself."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize() -> None:
    """Join the multi-process run, if there is one. Must run before any other JAX call."""
    f = flags.FLAGS
    if f[_COORDINATOR].value:
        if f.num_processes and f.num_processes > 1:
            # Cross-process collectives on the CPU backend (local tests, CPU clusters) need gloo;
            # other backends ignore this setting.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f[_COORDINATOR].value, f.num_processes, f.process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process gets here, through the coordination service rather than a collective.

    On CPU, the first cross-process collective must be reached by all processes
    within gloo's fixed 30 s context timeout; work that takes one process much
    longer than another (writing a tiny teacher, a slow compile) is fenced with
    this barrier, whose timeout is ours.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the coordination client has no public accessor

    jax_distributed.global_state.client.wait_at_barrier(f"swiftbrush:{name}", timeout_s * 1000)
