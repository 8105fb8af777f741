"""The official recipe's prompt file from JourneyDB's annotation files, as a user downloads them.

SwiftBrush trained on about 1.38M deduplicated JourneyDB prompts (docs/method.md §4: the
``prompt`` field of the train annotations). JourneyDB ships its annotations as
JSON lines (one object per image: ``img_path``, ``prompt``, ``Task1``, ...),
plain or compressed. This command reads them, takes each record's ``prompt``,
normalises its whitespace (``data.normalise_prompt``: a prompt spanning several
lines becomes one line), drops empty prompts and exact duplicates (first
occurrence wins, so the file order is kept), and writes one prompt per line,
UTF-8, through a temporary file renamed into place: an interrupted run never
leaves a half-written prompt file behind for the trainer to pick up.
"""

import bz2
import dataclasses
import gzip
import json
import lzma
import os
import tarfile
import zipfile
from typing import IO, Iterator, Sequence

from .prompts import normalise_prompt
from ..errors import UsageError

FIELD = "prompt"
JSON_LINES = (".jsonl", ".json")
SINGLE_FILE_COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
ARCHIVES = (".tgz", ".tar", ".tar.gz", ".tar.bz2", ".tar.xz", ".tbz2", ".txz", ".zip")
SUPPORTED = ".jsonl/.json, optionally .gz/.bz2/.xz-compressed, or a .tgz/.tar(.gz/.bz2/.xz)/.zip archive of them"
# Python's standard library reads Zstandard only from 3.14 on.
ZSTD = (".zst", ".zstd", ".tzst")
EXAMPLE = ("python -m swiftbrush_jax.prompts_journeydb "
           "--annotations data/train_anno_realease_repath.jsonl.tgz --out prompts/journeydb.txt")
# How many field names an error lists when a file has no prompt field.
LISTED_KEYS = 10


@dataclasses.dataclass
class JourneyDBStats:
    """What was read and why each record not kept was dropped; ``records`` = kept + every drop."""

    files: int = 0
    records: int = 0  # non-blank lines
    bad_json: int = 0  # not UTF-8 JSON, or not a JSON object
    missing_field: int = 0  # an object without a "prompt" key
    not_text: int = 0  # a prompt that is not a string, or holds a NUL or an unpaired surrogate
    empty: int = 0  # null, or nothing but whitespace
    duplicates: int = 0  # equal, after whitespace normalisation, to an earlier prompt
    kept: int = 0

    def describe(self) -> str:
        """The report's last line."""
        return (f"read {self.records} records from {self.files} annotation file(s): kept {self.kept} prompts; "
                f"dropped {self.duplicates} duplicates, {self.empty} empty, {self.missing_field} without a "
                f"{FIELD!r} field, {self.bad_json} bad JSON lines, {self.not_text} not text")


def _suffix_in(name: str, suffixes: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(suffixes))


def is_annotation_file(name: str) -> bool:
    """Whether a file name is one of the forms JourneyDB's annotations come in."""
    base = os.path.basename(name)
    if base.startswith("._"):  # macOS resource forks, common inside archives made on a Mac
        return False
    inner = base.lower()
    for compression in SINGLE_FILE_COMPRESSION:
        if inner.endswith(compression) and not _suffix_in(inner, ARCHIVES):
            inner = inner[: -len(compression)]
    return _suffix_in(inner, JSON_LINES + ARCHIVES + ZSTD)


def annotation_files(paths: Sequence[str]) -> list[str]:
    """The annotation files named, folders expanded (recursively, in name order)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                           if is_annotation_file(name))
            if not found:
                raise UsageError(f"{path}: no annotation files in this folder ({SUPPORTED}); "
                                 "point --annotations at JourneyDB's train_anno_realease_repath.jsonl(.tgz)")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder; pass JourneyDB's annotation file, e.g. "
                             "--annotations data/train_anno_realease_repath.jsonl.tgz")
    return files


def _json_line_streams(path: str) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, binary stream) of each JSON-lines file in ``path``: the file itself, decompressed, or archive members."""
    lower = path.lower()
    if _suffix_in(lower, ZSTD):
        raise UsageError(f"{path}: Zstandard needs Python 3.14; decompress it first "
                         f"(zstd -d {path}, or tar --zstd -xf for a .tar.zst) and pass the result")
    if _suffix_in(lower, (".zip",)):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if not member.is_dir() and is_annotation_file(member.filename):
                    with archive.open(member) as stream:
                        yield f"{path}:{member.filename}", stream
        return
    if _suffix_in(lower, ARCHIVES):
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile() and is_annotation_file(member.name):
                    yield f"{path}:{member.name}", archive.extractfile(member)
        return
    for suffix, opener in SINGLE_FILE_COMPRESSION.items():
        if lower.endswith(suffix):
            with opener(path, "rb") as stream:
                yield path, stream
            return
    if not _suffix_in(lower, JSON_LINES):
        raise UsageError(f"{path}: not an annotation file this command reads; use {SUPPORTED}")
    with open(path, "rb") as stream:
        yield path, stream


class PromptWriter:
    """Deduplicates normalised prompts and writes the new ones, one per line, counting every drop."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.stats = JourneyDBStats()
        self._seen: set[str] = set()

    def add_line(self, line: bytes) -> bool:
        """One JSON line; returns whether it was an object with the prompt field (usable or not)."""
        if not line.strip():
            return False
        self.stats.records += 1
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            self.stats.bad_json += 1
            return False
        if FIELD not in record:
            self.stats.missing_field += 1
            return False
        self._add_prompt(record[FIELD])
        return True

    def _add_prompt(self, value) -> None:
        if value is None:
            self.stats.empty += 1
            return
        if not isinstance(value, str):
            self.stats.not_text += 1
            return
        prompt = normalise_prompt(value)
        if not prompt:
            self.stats.empty += 1
        elif "\0" in prompt or not _encodable(prompt):  # the trainer's text reader drops NUL lines
            self.stats.not_text += 1
        elif prompt in self._seen:
            self.stats.duplicates += 1
        else:
            self._seen.add(prompt)
            self.out.write(prompt + "\n")
            self.stats.kept += 1


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate escape such as "\ud83d" in the JSON
        return False
    return True


def _keys_of(line: bytes) -> list[str]:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    return list(record) if isinstance(record, dict) else []


def read_annotation_file(path: str, writer: PromptWriter) -> int:
    """Every record of one annotation file into ``writer``; returns the records read from it."""
    before, files_before = writer.stats.records, writer.stats.files
    for name, stream in _json_line_streams(path):
        writer.stats.files += 1
        with_field, keys_seen = 0, {}
        for line in stream:
            if writer.add_line(line):
                with_field += 1
            elif len(keys_seen) < LISTED_KEYS:
                keys_seen.update(dict.fromkeys(_keys_of(line)))
        if not with_field:
            if keys_seen:
                listed = ", ".join(repr(k) for k in list(keys_seen)[:LISTED_KEYS])
                found = f"its records have no {FIELD!r} field (fields: {listed})"
            else:
                found = f"no JSON object with a {FIELD!r} field in it (not JSON lines, or empty)"
            raise UsageError(f"{name}: {found}; pass JourneyDB's train annotation file "
                             "train_anno_realease_repath.jsonl(.tgz), whose records carry the prompt")
    if writer.stats.files == files_before:
        raise UsageError(f"{path}: the archive holds no .jsonl/.json file; pass JourneyDB's "
                         "train_anno_realease_repath.jsonl.tgz, or the .jsonl file itself")
    return writer.stats.records - before


def build_prompt_file(annotations: Sequence[str], out: str, log=print) -> JourneyDBStats:
    """Read the annotation files (and folders of them), write ``out`` atomically; returns the counts."""
    files = annotation_files(annotations)
    if os.path.isdir(out):
        raise UsageError(f"{out}: is a folder; pass the prompt file to write, e.g. --out prompts/journeydb.txt")
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(out)}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8", newline="\n") as stream:
            writer = PromptWriter(stream)
            for path in files:
                try:
                    records = read_annotation_file(path, writer)
                except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError) as err:
                    raise UsageError(f"{path}: cannot be read ({err or type(err).__name__}); it may be damaged "
                                     "or incomplete: download it again") from None
                log(f"{path}: {records} records")
            stream.flush()
            os.fsync(stream.fileno())
        if not writer.stats.kept:
            raise UsageError(f"{', '.join(files)}: no usable prompt in {writer.stats.records} records; "
                             "pass JourneyDB's train annotation file train_anno_realease_repath.jsonl(.tgz)")
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    log(writer.stats.describe())
    log(f"wrote {out}")
    return writer.stats
