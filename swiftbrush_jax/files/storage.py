"""The one file layer: every path a user gives (workdir, prompt file, teacher, outputs) goes through here.

A path is a local path or a URL that ``etils.epath`` understands (``gs://bucket/dir``, also ``s3://``,
``az://``). epath is the layer because orbax already opens its checkpoint paths with it, so the
trainer's own files and orbax's are read and written the same way; without TensorFlow, epath serves
``gs://`` through fsspec's ``gcsfs``, which uses Application Default Credentials. Orbax's arrays are
written by tensorstore, which has its own GCS client.

Pointing the program at a GCS emulator takes one environment variable, ``STORAGE_EMULATOR_HOST``
(e.g. ``http://127.0.0.1:4443``): gcsfs honours it itself, and at import this module points
tensorstore there too (``TENSORSTORE_GCS_HTTP_URL``, with the fixed test token
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` that tensorstore accepts instead of real credentials) unless those
are already set.

An object store has no atomic rename, so ``atomic_dir`` publishes a remote folder by uploading every
file and then, last, the one a reader needs first (for a diffusers pipeline, ``model_index.json``):
a folder without it is incomplete.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional

import fsspec
from etils import epath

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
COPY_CHUNK_BYTES = 16 * 2**20


def _point_at_emulator() -> None:
    """Send tensorstore's (orbax's) GCS requests to the emulator gcsfs already uses, if one is set."""
    emulator = os.environ.get(EMULATOR_VARIABLE, "")
    if emulator in ("", "default"):
        return
    if "://" not in emulator:
        emulator = f"http://{emulator}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # gcsfs's default file system first asks the Storage Control API (which emulators lack) for each
    # bucket's layout, warning on every call when it cannot; the plain one does not ask.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_point_at_emulator()
# epath would serve gs:// through tf.io.gfile wherever TensorFlow is installed (the tfds extra installs
# it); gcsfs stays the one client, so its credentials and emulator settings are the ones that apply.
os.environ.setdefault("EPATH_USE_TF", "false")
# Orbax writes checkpoints through tensorstore, behind gcsfs's back: a cached listing would miss a new
# checkpoint or still show one moved aside, so gcsfs lists afresh every time.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def path(p) -> epath.Path:
    """``p`` as an epath (local or URL); local paths are made absolute, URLs are kept as given."""
    return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def is_remote(p) -> bool:
    """Whether ``p`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in os.fspath(p)


def join(*parts) -> str:
    """``parts`` joined as a path string (URLs stay URLs)."""
    return os.fspath(epath.Path(*parts)) if is_remote(parts[0]) else os.path.join(*map(os.fspath, parts))


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def isfile(p) -> bool:
    """An existing file (an object, on a bucket)."""
    target = path(p)
    return target.exists() and not target.is_dir()


def listdir(p) -> list:
    return sorted(child.name for child in path(p).iterdir())


def makedirs(p) -> None:
    """Create folder ``p`` and its parents (object stores have no folders: nothing is needed there)."""
    path(p).mkdir(parents=True, exist_ok=True)


def open_file(p, mode: str = "rb"):
    return path(p).open(mode)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_json(p, error=ValueError, what: str = ""):
    """A local JSON file (a config.json, a prompt set, a record); a missing or malformed one raises ``error``
    with one line naming it, after ``what`` (the flag or thing it was given as) where there is one."""
    name = f"{what} {p}" if what else str(p)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{name} is not valid JSON ({e})") from None


def write_bytes(p, data: bytes) -> None:
    """Write a whole file, creating its folder."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def copy_file(src, dst) -> None:
    """Copy one file between any two places, streamed in chunks (weights may be gigabytes)."""
    target = path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    with path(src).open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer, COPY_CHUNK_BYTES)


def files_under(p) -> list:
    """Paths of every file under folder ``p``, relative to it, sorted."""
    def walk(folder: epath.Path, prefix: str) -> Iterator[str]:
        for child in folder.iterdir():
            if child.is_dir():
                yield from walk(child, f"{prefix}{child.name}/")
            else:
                yield prefix + child.name

    return sorted(walk(path(p), ""))


def copy_tree(src, dst, written_last: Optional[str] = None) -> None:
    """Copy every file under ``src`` to ``dst`` (following symbolic links), ``written_last`` after all others."""
    names = files_under(src)
    if written_last in names:
        names = [n for n in names if n != written_last] + [written_last]
    for name in names:
        copy_file(join(src, name), join(dst, name))


def remove_tree(p) -> None:
    """Delete folder ``p`` and everything under it, if it exists."""
    path(p).rmtree(missing_ok=True)


def move_tree(src, dst) -> None:
    """Move folder ``src`` to ``dst``: a rename on a local disk; on an object store, a copy of every
    file and then the deletion of the originals (not atomic; a reader never sees ``src`` half-deleted
    before the copy is whole)."""
    if not (is_remote(src) or is_remote(dst)):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.move(src, dst)
        return
    copy_tree(src, dst)
    remove_tree(src)


def free_bytes(p) -> Optional[int]:
    """Free space on the local disk holding folder ``p``; None for an object store, which has no such figure."""
    if is_remote(p) or not os.path.isdir(p):
        return None
    return shutil.disk_usage(p).free


@contextlib.contextmanager
def atomic_dir(out, written_last: str) -> Iterator[str]:
    """Yield a new local folder to fill; when the block succeeds it becomes ``out``, else it is deleted.

    Locally the folder is a temporary sibling of ``out`` renamed onto it (an empty ``out`` is replaced):
    ``out`` appears whole or not at all. On an object store every file is uploaded and ``written_last``
    (the file a reader opens first) comes after all others, so a reader never finds it in a partial
    folder; a failed upload removes what it wrote.
    """
    remote = is_remote(out)
    parent = None if remote else os.path.dirname(os.path.abspath(out))
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.fspath(out).rstrip('/'))}.partial-", dir=parent)
    try:
        yield staging
        if remote:
            try:
                copy_tree(staging, out, written_last=written_last)
            except BaseException:
                remove_tree(out)
                raise
        else:
            if os.path.isdir(out):
                os.rmdir(out)  # only an empty one; rename cannot replace it otherwise
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_root() -> str:
    """Where remote folders are copied to be read locally: $SWIFTBRUSH_CACHE, else ~/.cache/swiftbrush-jax."""
    return os.environ.get("SWIFTBRUSH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swiftbrush-jax")


def local_copy(folder, complete_marker: str) -> str:
    """A local copy of remote ``folder`` (made once, kept in ``cache_root()``); a local folder as it is.

    The copy is made in a temporary sibling renamed into place, so a killed download is never reused;
    ``complete_marker`` is a file the remote folder must hold (it is the last a writer uploads)."""
    if not is_remote(folder):
        return os.fspath(folder)
    scheme, rest = os.fspath(folder).rstrip("/").split("://", 1)
    local = os.path.join(cache_root(), scheme, rest)
    if os.path.isdir(local):
        return local
    if not exists(join(folder, complete_marker)):
        raise FileNotFoundError(f"{folder} has no {complete_marker} (missing, or not completely written)")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.partial-", dir=os.path.dirname(local))
    try:
        copy_tree(folder, staging)
        try:
            os.rename(staging, local)
        except OSError:  # another process on this host finished the same copy first
            if not os.path.isdir(local):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


class RewrittenObject:
    """A file written by appending, kept on an object store (which cannot append) by rewriting it.

    Each ``flush`` uploads everything written so far; past ``ROLLOVER_BYTES`` the next writes start a
    new object named ``<path>.<n>``, so a long run's uploads stay small. TensorBoard reads every
    ``*tfevents*`` object of a folder, in name order, so a rolled-over event file reads as one.
    """

    ROLLOVER_BYTES = 32 * 2**20

    def __init__(self, p):
        self.base, self.part, self.buffer, self.uploaded = os.fspath(p), 0, bytearray(), 0

    def write(self, data: bytes) -> None:
        if len(self.buffer) >= self.ROLLOVER_BYTES:
            self.flush()
            self.part, self.buffer, self.uploaded = self.part + 1, bytearray(), 0
        self.buffer += data

    def flush(self) -> None:
        if len(self.buffer) != self.uploaded:
            write_bytes(self.base if self.part == 0 else f"{self.base}.{self.part}", bytes(self.buffer))
            self.uploaded = len(self.buffer)

    def close(self) -> None:
        self.flush()


class _RewrittenObjects:
    """tensorboardX's writer factory interface (``open``, ``directory_check``) for URLs."""

    def open(self, p) -> RewrittenObject:
        return RewrittenObject(p)

    def directory_check(self, p) -> None:
        makedirs(p)


def summary_writer(logdir):
    """A tensorboardX SummaryWriter whose event files, local or at a URL, are written through this module
    (tensorboardX's own gs:// writer would be a second GCS client)."""
    from tensorboardX import SummaryWriter, record_writer

    if is_remote(logdir):
        record_writer.register_writer_factory(os.fspath(logdir).split("://", 1)[0], _RewrittenObjects())
    return SummaryWriter(os.fspath(path(logdir)))
