"""The JourneyDB prompt file builder on small annotation files of JourneyDB's shape, plain and compressed."""

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile

import pytest

from swiftbrush_jax.data.prompts import load_prompts
from swiftbrush_jax.data.journeydb import JourneyDBStats, build_prompt_file
from swiftbrush_jax.prompts_journeydb import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(prompt, index=0, **extra):
    """One annotation as JourneyDB writes it: image path, prompt, caption tasks."""
    fields = {"img_path": f"./{index:03d}/{index:08x}.jpg", "prompt": prompt,
              "Task1": {"Style": ["photo"], "Content": ["cat"]}, "Task2": {"Caption": "a cat"}}
    fields.update(extra)
    return fields


def json_lines(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" if isinstance(r, dict) else r for r in records)


# Every kind of record: kept, duplicate after normalisation, empty, missing field, bad JSON, not text.
MIXED = [
    record("A cat\nwearing a  hat, --ar 16:9", 0),
    record("  a lighthouse at dusk ", 1),
    record("A cat wearing a hat, --ar 16:9", 2),  # duplicate of the first once normalised
    record("   \n\t", 3),  # empty
    record(None, 4),  # empty
    {"img_path": "./005/x.jpg", "Task1": {}},  # no prompt field
    b"{not json\n",
    b"\xff\xfe\n",
    record(42, 8),  # not text
    b"\n",  # blank line: not a record
    record("a lighthouse at dusk", 9),  # duplicate
    record("a cafe \u00e9 \u732b", 10),
]
KEPT = ["A cat wearing a hat, --ar 16:9", "a lighthouse at dusk", "a cafe \u00e9 \u732b"]
COUNTS = JourneyDBStats(files=1, records=11, bad_json=2, missing_field=1, not_text=1, empty=2, duplicates=2,
                        kept=3)


def written(path) -> list:
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    return data.decode("utf-8").split("\n")[:-1]


def test_plain_jsonl_counts_and_content(tmp_path):
    source = tmp_path / "train_anno_realease_repath.jsonl"
    source.write_bytes(json_lines(MIXED))
    out = tmp_path / "prompts" / "journeydb.txt"
    stats = build_prompt_file([str(source)], str(out), log=lambda line: None)
    assert stats == COUNTS
    assert written(out) == KEPT
    assert sorted(os.listdir(out.parent)) == ["journeydb.txt"]  # the temporary file is gone
    # The trainer reads the file back unchanged.
    assert load_prompts(str(out))[0] == KEPT


def tgz_of(path, name, data: bytes):
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        resource_fork = tarfile.TarInfo("._" + name)  # what a Mac's tar adds; not JSON
        resource_fork.size = 4
        archive.addfile(resource_fork, io.BytesIO(b"\0\x05\x16\x07"))


@pytest.mark.parametrize("name", ["train_anno_realease_repath.jsonl.tgz", "anno.jsonl.gz", "anno.jsonl.bz2",
                                  "anno.jsonl.xz"])
def test_compressed_forms(tmp_path, name):
    data = json_lines(MIXED)
    path = tmp_path / name
    if name.endswith(".tgz"):
        tgz_of(path, "train_anno_realease_repath.jsonl", data)
    else:
        opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[os.path.splitext(name)[1]]
        with opener(path, "wb") as f:
            f.write(data)
    out = tmp_path / "journeydb.txt"
    assert build_prompt_file([str(path)], str(out), log=lambda line: None) == COUNTS
    assert written(out) == KEPT


def test_folder_deduplicates_across_files_in_name_order(tmp_path):
    folder = tmp_path / "JourneyDB" / "annotations"
    folder.mkdir(parents=True)
    (folder / "b.jsonl").write_bytes(json_lines([record("second file"), record("shared")]))
    with gzip.open(folder / "a.jsonl.gz", "wb") as f:
        f.write(json_lines([record("first file"), record("shared")]))
    (folder / "README.md").write_text("not annotations")
    out = tmp_path / "journeydb.txt"
    stats = build_prompt_file([str(tmp_path / "JourneyDB")], str(out), log=lambda line: None)
    assert written(out) == ["first file", "shared", "second file"]
    assert (stats.files, stats.records, stats.duplicates, stats.kept) == (2, 4, 1, 3)


def test_report_and_existing_output_replaced(tmp_path, capsys):
    source = tmp_path / "anno.jsonl"
    source.write_bytes(json_lines(MIXED))
    out = tmp_path / "journeydb.txt"
    out.write_text("stale\n")
    main(["--annotations", str(source), "--out", str(out)])
    report = capsys.readouterr().out
    assert f"{source}: 11 records" in report
    assert ("read 11 records from 1 annotation file(s): kept 3 prompts; dropped 2 duplicates, 2 empty, "
            "1 without a 'prompt' field, 2 bad JSON lines, 1 not text") in report
    assert written(out) == KEPT


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "swiftbrush_jax.prompts_journeydb", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_errors_are_one_line_with_the_fix(tmp_path):
    out = tmp_path / "journeydb.txt"
    missing = run_cli("--annotations", str(tmp_path / "nope.jsonl"), "--out", str(out))
    no_field = tmp_path / "captions.jsonl"
    no_field.write_bytes(json_lines([{"img_path": "a.jpg", "caption": "a cat"}] * 3))
    wrong_file = run_cli("--annotations", str(no_field), "--out", str(out))
    zst = tmp_path / "anno.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd")
    no_zstd = run_cli("--annotations", str(zst), "--out", str(out))
    damaged = tmp_path / "anno.jsonl.tgz"
    damaged.write_bytes(gzip.compress(b"x" * 100)[:20])
    truncated = run_cli("--annotations", str(damaged), "--out", str(out))
    for proc, words in ((missing, [f"{tmp_path / 'nope.jsonl'}: no such file or folder"]),
                        (wrong_file, [f"{no_field}: its records have no 'prompt' field (fields: 'img_path', "
                                      "'caption')", "train_anno_realease_repath.jsonl"]),
                        (no_zstd, [f"{zst}: Zstandard", "zstd -d"]),
                        (truncated, [f"{damaged}: cannot be read", "download it again"])):
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        for word in words:
            assert word in proc.stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["anno.jsonl.tgz", "anno.jsonl.zst", "captions.jsonl"]


def test_help_shows_an_example():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "python -m swiftbrush_jax.prompts_journeydb --annotations" in proc.stdout
