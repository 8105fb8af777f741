"""Prompt data: loading a prompt file, a deterministic multi-host prompt order, prefetching.

SwiftBrush trains on text prompts alone. The pipeline has three parts:

* ``load_prompts`` reads a prompt source (.txt, .jsonl/.json lines, .csv,
  .parquet or a TFDS dataset), normalises whitespace, drops empty, undecodable
  and duplicate prompts, and reports what it dropped in ``PromptStats``.
* ``PromptStream`` fixes the global prompt order as a pure function of the
  prompts, the seed and the global batch size, so that resuming at step k
  continues with the next unseen prompt and every host of a multi-host run
  agrees on each global batch without communicating.
* ``Prefetcher`` prepares the next host batches (e.g. tokenised arrays) on a
  background thread, so the train step never waits on prompt I/O.
"""

import csv
import dataclasses
import hashlib
import json
import os
import queue
import threading
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..files import storage

SUPPORTED_SOURCES = ".txt, .jsonl, .json (JSON lines), .csv, .parquet or tfds:<name>[/<config>]:<split>:<feature path>"
TFDS_PREFIX = "tfds:"
UTF8_BOM = b"\xef\xbb\xbf"
# How many column names an error message lists before eliding the rest.
LISTED_COLUMNS = 20


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; the one-line message names the source and the fix."""


@dataclasses.dataclass
class PromptStats:
    """What loading a prompt source kept and dropped; ``read`` = kept + empty + undecodable + duplicates."""

    read: int = 0
    kept: int = 0
    empty: int = 0
    undecodable: int = 0
    duplicates: int = 0

    def describe(self) -> str:
        """One log line."""
        return (
            f"read {self.read} prompts, kept {self.kept} (dropped {self.empty} empty, "
            f"{self.undecodable} undecodable, {self.duplicates} duplicates)"
        )


def normalise_prompt(text: str) -> str:
    """Strip the prompt and collapse each internal whitespace run to one space."""
    return " ".join(text.split())


class _PromptCollector:
    """Accumulates normalised, deduplicated prompts (first occurrence wins) and the counts."""

    def __init__(self):
        self.prompts: list[str] = []
        self.stats = PromptStats()
        self._seen: set[str] = set()

    def add_text(self, text: Optional[str]) -> None:
        self.stats.read += 1
        prompt = normalise_prompt(text) if text else ""
        if not prompt:
            self.stats.empty += 1
        elif prompt in self._seen:
            self.stats.duplicates += 1
        else:
            self._seen.add(prompt)
            self.prompts.append(prompt)
            self.stats.kept += 1

    def add_bytes(self, raw: bytes) -> None:
        if b"\0" in raw:  # UTF-16/32 text or binary data: may pass as UTF-8, but is never a prompt
            self.add_undecodable()
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.add_undecodable()
            return
        self.add_text(text)

    def add_undecodable(self) -> None:
        self.stats.read += 1
        self.stats.undecodable += 1


def _list_columns(names: Iterable[str]) -> str:
    names = list(names)
    listed = ", ".join(repr(n) for n in names[:LISTED_COLUMNS])
    more = len(names) - LISTED_COLUMNS
    return listed + (f" and {more} more" if more > 0 else "") if names else "none"


def _missing_column(source: str, column: str, available: Iterable[str]) -> PromptSourceError:
    return PromptSourceError(
        f"{source}: no column {column!r}; available columns: {_list_columns(available)}; "
        f"pass the prompt column's name as column="
    )


def _read_lines(path: str, keepends: bool = False) -> list[bytes]:
    """The file's lines as undecoded bytes, a leading UTF-8 byte-order mark removed."""
    data = storage.read_bytes(path)
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    return data.splitlines(keepends=keepends)


def _read_txt(path: str, collector: _PromptCollector) -> None:
    for line in _read_lines(path):
        collector.add_bytes(line)


def _read_json_lines(path: str, column: str, collector: _PromptCollector) -> None:
    """One JSON object per line; a line that is not UTF-8 JSON, or not an object, is undecodable."""
    keys_seen: dict[str, None] = {}  # insertion-ordered set of the keys records did have
    column_seen = False
    for line in _read_lines(path):
        if not line.strip():
            collector.add_text("")
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            collector.add_undecodable()
            continue
        if not isinstance(record, dict):
            collector.add_undecodable()
            continue
        if column not in record:
            keys_seen.update(dict.fromkeys(record))
            collector.add_text("")
            continue
        column_seen = True
        value = record[column]
        if value is None or isinstance(value, str):
            collector.add_text(value)
        else:
            collector.add_undecodable()
    if keys_seen and not column_seen:
        raise _missing_column(path, column, keys_seen)


def _read_csv(path: str, column: str, collector: _PromptCollector) -> None:
    """A header row naming the columns, then one record per row (quoted fields may span lines)."""
    lines = _read_lines(path, keepends=True)
    if not lines:
        return
    try:
        header = next(csv.reader([lines[0].decode("utf-8")]))
    except UnicodeDecodeError:
        raise PromptSourceError(f"{path}: the CSV header row is not UTF-8; re-encode the file as UTF-8") from None
    if column not in header:
        raise _missing_column(path, column, header)
    index = header.index(column)

    def decodable_lines():
        for line in lines[1:]:
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                collector.add_undecodable()

    for row in csv.reader(decodable_lines()):
        collector.add_text(row[index] if index < len(row) else "")


def _read_parquet(path: str, column: str, collector: _PromptCollector) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_file(path) as f:
            schema = pq.read_schema(f)
    except (pa.ArrowException, OSError) as err:
        raise PromptSourceError(f"{path}: not a readable Parquet file ({err}); check the file or its extension") from None
    if column not in schema.names:
        raise _missing_column(path, column, schema.names)
    column_type = schema.field(column).type
    with storage.open_file(path) as f:
        values = pq.read_table(f, columns=[column]).column(column)
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        for text in values.to_pylist():
            collector.add_text(text)
    elif pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        for raw in values.to_pylist():
            if raw is None:
                collector.add_text(None)
            else:
                collector.add_bytes(raw)
    else:
        raise PromptSourceError(
            f"{path}: column {column!r} holds {column_type}, not strings; pass a text column as column="
        )


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A parsed ``tfds:<name>[/<config>]:<split>:<feature path>`` source."""

    name: str
    split: str
    feature_path: tuple[str, ...]


def parse_tfds_source(source: str) -> TfdsSource:
    """Split a tfds: source; the split may itself hold colons (e.g. ``train[:1000]``)."""
    body = source[len(TFDS_PREFIX):]
    name, _, rest = body.partition(":")
    split, _, feature = rest.rpartition(":")
    path = tuple(part for part in feature.split("/") if part)
    if not name or not split or not path:
        raise PromptSourceError(
            f"{source}: malformed TFDS source; write tfds:<name>[/<config>]:<split>:<feature path>, "
            f"e.g. tfds:coco_captions/2014:train:captions/text"
        )
    return TfdsSource(name=name, split=split, feature_path=path)


def _feature(source: str, example: Any, path: tuple) -> Any:
    """Walk the feature path into one example."""
    value = example
    for depth, key in enumerate(path):
        if not isinstance(value, dict) or key not in value:
            available = list(value) if isinstance(value, dict) else []
            where = "/".join(path[:depth]) or "the example"
            raise PromptSourceError(
                f"{source}: no feature {key!r} in {where}; available features: {_list_columns(available)}"
            )
        value = value[key]
    return value


def _read_tfds(source: str, collector: _PromptCollector) -> None:
    """Every string under the feature path of every example (sequences such as COCO's captions flattened)."""
    spec = parse_tfds_source(source)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise PromptSourceError(
            f'{source}: reading TFDS prompt sources needs tensorflow_datasets; pip install "swiftbrush-jax[tfds]"'
        ) from None
    try:
        dataset = tfds.load(spec.name, split=spec.split, shuffle_files=False)
    except Exception as err:  # tfds raises many types; all mean the same to the user.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PromptSourceError(f"{source}: TFDS could not load the dataset: {first_line}") from err
    for example in tfds.as_numpy(dataset):
        for value in np.asarray(_feature(source, example, spec.feature_path), dtype=object).ravel():
            if isinstance(value, bytes):
                collector.add_bytes(value)
            elif isinstance(value, str):
                collector.add_text(value)
            else:
                collector.add_undecodable()


# What each format's lines are expected to be, for the "mostly undecodable" error.
EXPECTED_CONTENT = {
    ".txt": "UTF-8 text",
    ".jsonl": "UTF-8 JSON lines (one object per line)",
    ".json": "UTF-8 JSON lines (one object per line)",
    ".csv": "UTF-8 CSV",
    ".parquet": "UTF-8 strings",
}


def _no_usable_prompts(source: str, kind: str, stats: PromptStats) -> PromptSourceError:
    if stats.read == 0:
        return PromptSourceError(f"{source}: holds no prompts; point the prompt source at a non-empty file")
    detail = f"none of its {stats.read} entries is a usable prompt ({stats.empty} empty, {stats.undecodable} undecodable)"
    if stats.undecodable * 2 > stats.read:
        fix = f"the source is not {kind}; convert it (e.g. iconv -f <encoding> -t UTF-8)"
    else:
        fix = "check that the right file and column were given"
    return PromptSourceError(f"{source}: {detail}; {fix}")


def load_prompts(source: str, column: str = "text") -> tuple[list[str], PromptStats]:
    """Read a prompt source; returns (prompts, PromptStats), prompts normalised and unique in file order."""
    source = os.fspath(source)
    collector = _PromptCollector()
    if source.startswith(TFDS_PREFIX):
        _read_tfds(source, collector)
        kind = "UTF-8 text"
    else:
        extension = os.path.splitext(source)[1].lower()
        if extension not in EXPECTED_CONTENT:
            raise PromptSourceError(
                f"{source}: unknown prompt file extension {extension or '(none)'!r}; use {SUPPORTED_SOURCES}"
            )
        if not storage.isfile(source):
            raise PromptSourceError(f"{source}: no such prompt file; check the path (sources: {SUPPORTED_SOURCES})")
        if extension == ".txt":
            _read_txt(source, collector)
        elif extension in (".jsonl", ".json"):
            _read_json_lines(source, column, collector)
        elif extension == ".csv":
            _read_csv(source, column, collector)
        else:
            _read_parquet(source, column, collector)
        kind = EXPECTED_CONTENT[extension]
    if not collector.prompts:
        raise _no_usable_prompts(source, kind, collector.stats)
    return collector.prompts, collector.stats


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of the prompt list in order, to tell whether a checkpoint was made with the same prompts."""
    joined = "\0".join(prompts).encode("utf-8", "surrogatepass")
    return hashlib.sha256(joined).hexdigest()


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
