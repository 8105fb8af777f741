"""Multi-host start-up (explicit coordinator flags, or auto-detection on TPU pods and SLURM), and the
watchdog that ends every surviving process in bounded time when one is lost."""

import os
import sys
import threading
import time

import jax
import numpy as np
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


EXIT_PEER_LOST = 3


def initialize(peer_timeout_s: int = 300) -> None:
    """Join the multi-process run, if there is one, and start the peer watchdog. Must run before any other
    JAX call.

    The coordination service's own heartbeat timeout is set well past ``peer_timeout_s``: when it fires, JAX
    aborts the process with a C++ stack trace, so the watchdog must always come first."""
    f = flags.FLAGS
    service = dict(heartbeat_timeout_seconds=2 * peer_timeout_s + 30)
    if f[_COORDINATOR].value:
        if f.num_processes and f.num_processes > 1:
            # Cross-process collectives on the CPU backend (local tests, CPU clusters) need gloo;
            # other backends ignore this setting.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f[_COORDINATOR].value, f.num_processes, f.process_id, **service)
    elif _cluster_detected():
        jax.distributed.initialize(**service)
    else:
        return
    if jax.process_count() > 1:
        global _watchdog
        _watchdog = _Watchdog(peer_timeout_s)
        _watchdog.start()


def _client():
    from jax._src import distributed as jax_distributed  # the coordination client has no public accessor

    return jax_distributed.global_state.client


def lost_peer(index: int, count: int, me: int, timeout_s: float, detail: str) -> None:
    """End this process at once with one line naming the lost process: its collectives would wait on the
    peer forever (a hung host) or until JAX aborts. Checkpoints only ever appear complete, so a restart of
    every process resumes from the newest one. The line starts a line of its own, after a progress bar
    the main thread may be drawing. Calls no JAX function: it runs on the watchdog's thread,
    possibly while the main thread is tearing JAX down."""
    print(f"\nerror: process {index} of {count} was lost ({detail}; this is process {me}, "
          f"peer_timeout_s={timeout_s:g}); stopping without saving: restart all processes to resume from "
          f"the newest complete checkpoint", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


_watchdog = None


def _from_jax_runtime(e: BaseException) -> bool:
    """Whether ``e`` or an exception it was raised from is a JAX runtime error (a failed collective)."""
    while e is not None:
        if isinstance(e, jax.errors.JaxRuntimeError):
            return True
        e = e.__cause__ or e.__context__
    return False


def peer_loss_first(main):
    """Run ``main``; when it fails with a runtime error in a multi-process run, wait up to the watchdog's
    limit before letting the error out. A collective whose peer died fails at once (gloo: "Connection reset
    by peer") without saying which peer; the watchdog names it and ends the process."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:
            if _watchdog is not None and _from_jax_runtime(e):
                print(f"a collective failed ({' '.join(str(e).split())[:300]}); waiting up to "
                      f"{_watchdog.timeout_s:g} s (peer_timeout_s) to find the lost process",
                      file=sys.stderr, flush=True)
                time.sleep(_watchdog.timeout_s + 5 * _watchdog.interval + 1)
            raise

    return wrapped


class _Watchdog(threading.Thread):
    """Each process beats a counter in the coordination service's key-value store and watches the others'.

    A peer whose counter has not moved for ``timeout_s`` (by this process's clock, so clocks need not
    agree) is lost: killed, out of memory, or hung. A coordination service that stops answering means
    process 0, which hosts it, is lost. Runs through compilations, which release the GIL; a process that
    ended normally says so first (``finished``) and is no longer watched."""

    PREFIX = "swiftbrush_watchdog"

    def __init__(self, timeout_s: float):
        super().__init__(name="peer-watchdog", daemon=True)
        self.timeout_s = timeout_s
        self.interval = min(1.0, timeout_s / 10)
        self.me, self.count = jax.process_index(), jax.process_count()

    def run(self):
        client, beats = _client(), 0
        last_change = {i: time.monotonic() for i in range(self.count) if i != self.me}
        seen = {}
        coordinator_ok = time.monotonic()
        while True:
            beats += 1
            try:
                client.key_value_set(f"{self.PREFIX}/beat/{self.me}", str(beats), allow_overwrite=True)
                values = dict(client.key_value_dir_get(f"{self.PREFIX}/"))
                coordinator_ok = time.monotonic()
            except Exception as e:  # the service is on process 0; any failure to reach it counts against it
                if self.me != 0 and time.monotonic() - coordinator_ok > self.timeout_s:
                    lost_peer(0, self.count, self.me, self.timeout_s,
                              f"the coordination service it hosts stopped answering: {' '.join(str(e).split())[:200]}")
                time.sleep(self.interval)
                continue
            now = time.monotonic()
            for i in list(last_change):
                if f"{self.PREFIX}/done/{i}" in values:
                    del last_change[i]
                    continue
                beat = values.get(f"{self.PREFIX}/beat/{i}")
                if beat != seen.get(i):
                    seen[i], last_change[i] = beat, now
                elif now - last_change[i] > self.timeout_s:
                    lost_peer(i, self.count, self.me, self.timeout_s,
                              f"no heartbeat for {now - last_change[i]:.0f} s")
            time.sleep(self.interval)


def finished() -> None:
    """Tell the other processes' watchdogs that this one is ending normally (it may leave before they do)."""
    if jax.process_count() > 1:
        _client().key_value_set(f"{_Watchdog.PREFIX}/done/{jax.process_index()}", "1", allow_overwrite=True)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process: one tiny all-gather, so that every process takes the same
    decision at the same step (a stop signal reaches processes at different steps)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process gets here, through the coordination service rather than a collective.

    On CPU, the first cross-process collective must be reached by all processes
    within gloo's fixed 30 s context timeout; work that takes one process much
    longer than another (writing a tiny teacher, a slow compile) is fenced with
    this barrier, whose timeout is ours.
    """
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(f"swiftbrush:{name}", timeout_s * 1000)
