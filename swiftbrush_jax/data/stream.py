"""The prompt order of a run and its prefetching.

* ``PromptStream`` fixes the global prompt order as a pure function of the
  prompts, the seed and the global batch size, so that resuming at step k
  continues with the next unseen prompt and every host of a multi-host run
  agrees on each global batch without communicating.
* ``Prefetcher`` prepares the next host batches (e.g. tokenised arrays) on a
  background thread, so the train step never waits on prompt I/O.
"""

import queue
import threading
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .prompts import prompts_digest


class PromptStream:
    """The infinite, deterministic prompt order, and this host's share of each global batch.

    The global order is epoch after epoch; epoch e is the permutation of the
    prompts drawn from ``np.random.default_rng([seed, e])``. Global batch k is
    global positions [k*G, (k+1)*G), running across epoch boundaries; host p of
    P gets its rows [p*G/P, (p+1)*G/P). Everything is a pure function of
    (prompts, seed, G, k): no state advances, so resuming is calling
    ``batch(k)`` with the step to resume at.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(prompts) == 0:
            raise ValueError("PromptStream needs at least one prompt")
        if global_batch < 1:
            raise ValueError(f"global_batch must be positive, got {global_batch}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if global_batch % process_count:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by process_count {process_count}; "
                f"choose a global batch that is a multiple of the number of hosts"
            )
        self.prompts = list(prompts)
        self.global_batch = global_batch
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self.host_batch = global_batch // process_count
        self.digest = prompts_digest(self.prompts)
        # The last two epochs' permutations, replaced as a whole so a reader thread never sees a half update.
        self._recent_permutations: dict[int, np.ndarray] = {}

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of prompt indices in one epoch."""
        cached = self._recent_permutations.get(epoch)
        if cached is None:
            cached = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            kept = {e: p for e, p in self._recent_permutations.items() if e == epoch - 1}
            self._recent_permutations = {**kept, epoch: cached}
        return cached

    def _rows(self, start: int, stop: int) -> list[str]:
        """Prompts at global positions [start, stop)."""
        rows = []
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.num_prompts)
            count = min(stop - position, self.num_prompts - offset)
            rows.extend(self.prompts[i] for i in self.permutation(epoch)[offset:offset + count])
            position += count
        return rows

    def batch(self, step: int) -> list[str]:
        """This host's rows of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        start = step * self.global_batch + self.process_index * self.host_batch
        return self._rows(start, start + self.host_batch)

    def batches(self, start_step: int = 0) -> Iterator[list[str]]:
        """This host's batches from ``start_step`` on, forever."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def epoch_of(self, step: int) -> int:
        """The epoch that the first prompt of global batch ``step`` belongs to."""
        return step * self.global_batch // self.num_prompts

    def state(self, step: int) -> dict:
        """What a checkpoint taken before batch ``step`` (after ``step`` batches) stores about the prompts."""
        return {
            "prompt_position": step * self.global_batch,
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "prompts_sha256": self.digest,
        }

    def check_resumable(self, saved_state: dict) -> int:
        """Check a checkpoint's ``state`` against this stream; returns the step whose batch comes next."""
        missing = [k for k in ("prompt_position", "num_prompts", "seed", "prompts_sha256") if k not in saved_state]
        if missing:
            raise ValueError(f"checkpoint prompt state lacks {missing}; it was not written by PromptStream.state")
        if int(saved_state["seed"]) != self.seed:
            raise ValueError(
                f"prompt seed changed since the checkpoint ({saved_state['seed']} -> {self.seed}); "
                f"resume with seed {saved_state['seed']} or start a new run"
            )
        if int(saved_state["num_prompts"]) != self.num_prompts:
            raise ValueError(
                f"prompt set changed since the checkpoint ({saved_state['num_prompts']} -> {self.num_prompts} "
                f"prompts); resume with the original prompt source or start a new run"
            )
        if saved_state["prompts_sha256"] != self.digest:
            raise ValueError(
                "prompt set changed since the checkpoint (same count, different prompts or order); "
                "resume with the original prompt source or start a new run"
            )
        position = int(saved_state["prompt_position"])
        if position % self.global_batch:
            raise ValueError(
                f"checkpoint stopped at prompt {position}, which is not a multiple of the global batch "
                f"{self.global_batch}; resume with the checkpoint's global batch size"
            )
        return position // self.global_batch


class _WorkerFailed:
    """Carries an exception raised in the prefetch thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_EXHAUSTED = object()
# How often a prefetch thread blocked on a full queue checks whether it was closed.
POLL_SECONDS = 0.05


class Prefetcher:
    """Iterates over ``source`` on a daemon thread, keeping up to ``depth`` items ready.

    An exception raised by ``source`` is re-raised by ``next`` after the items
    before it. ``close`` (or leaving the ``with`` block) stops the thread once
    ``source`` yields again and closes ``source`` if it is a generator; the
    thread is a daemon, so a source stuck in I/O never holds up interpreter exit.
    """

    def __init__(self, source: Iterable, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._fill, args=(iter(source),), name="prompt-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Queue an item, giving up if the consumer closed; True when queued."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_EXHAUSTED)
        except BaseException as error:  # Anything the source raises belongs to the consumer.
            self._put(_WorkerFailed(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _EXHAUSTED:
            self._finished = True
            raise StopIteration
        if isinstance(item, _WorkerFailed):
            self._finished = True
            raise item.error
        return item

    def close(self, timeout: Optional[float] = 1.0) -> None:
        """Stop prefetching; waits up to ``timeout`` seconds for the thread to end."""
        self._finished = True
        self._closed.set()
        self._thread.join(timeout)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
