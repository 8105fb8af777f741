"""Prompt sources: a prompt file or dataset read into a clean list of prompts.

SwiftBrush trains on text prompts alone. ``load_prompts`` reads a prompt source (.txt, .jsonl/.json lines, .csv,
  .parquet or a TFDS dataset), normalises whitespace, drops empty, undecodable
  and duplicate prompts, and reports what it dropped in ``PromptStats``;
``swiftbrush_jax.data.stream`` then orders them.
"""

import csv
import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Optional, Sequence

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
