"""Prompt loading, the deterministic multi-host prompt order, and the prefetch thread."""

import json
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from swiftbrush_jax.data.prompts import PromptSourceError, PromptStats, load_prompts, parse_tfds_source
from swiftbrush_jax.data.stream import Prefetcher, PromptStream


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return str(path)


# --- load_prompts: formats ---------------------------------------------------


def test_txt_normalises_and_keeps_file_order(tmp_path):
    source = write_bytes(tmp_path / "p.txt", b"\xef\xbb\xbfa  red\tcat \r\n  dog\n\nbird\n")
    prompts, stats = load_prompts(source)
    assert prompts == ["a red cat", "dog", "bird"]
    assert stats == PromptStats(read=4, kept=3, empty=1, undecodable=0, duplicates=0)


def test_counts_empty_undecodable_and_duplicates(tmp_path):
    data = b"one\n   \n\xff\xfe bad\none\n  one  \ntwo\n\t\n"
    prompts, stats = load_prompts(write_bytes(tmp_path / "p.txt", data))
    assert prompts == ["one", "two"]
    assert stats == PromptStats(read=7, kept=2, empty=2, undecodable=1, duplicates=2)
    assert stats.read == stats.kept + stats.empty + stats.undecodable + stats.duplicates
    assert "kept 2" in stats.describe()


@pytest.mark.parametrize("name", ["p.jsonl", "p.json"])
def test_json_lines_reads_the_named_field(tmp_path, name):
    lines = [
        json.dumps({"caption": "a fox", "id": 1}).encode(),
        b"",
        b"{not json",
        b"\xff\xfe bad",
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"id": 3}).encode(),
        json.dumps({"caption": None}).encode(),
        json.dumps({"caption": 7}).encode(),
        json.dumps({"caption": "  a   fox "}).encode(),
        json.dumps({"caption": "snow \u00e9t\u00e9"}).encode(),
    ]
    prompts, stats = load_prompts(write_bytes(tmp_path / name, b"\n".join(lines)), column="caption")
    assert prompts == ["a fox", "snow \u00e9t\u00e9"]
    assert stats == PromptStats(read=10, kept=2, empty=3, undecodable=4, duplicates=1)


def test_csv_reads_the_named_column_with_quoting(tmp_path):
    data = (
        b'id,prompt,score\n'
        b'1,"a cat, sitting",0.5\n'
        b'2,"a ""quoted"" word",0.1\n'
        b'3,"two\nlines",0.2\n'
        b'4\n'
        b'5,\xff\xfe bad,0.3\n'
        b'6,a cat,0.4\n'
    )
    prompts, stats = load_prompts(write_bytes(tmp_path / "p.csv", data), column="prompt")
    assert prompts == ["a cat, sitting", 'a "quoted" word', "two lines", "a cat"]
    assert stats == PromptStats(read=6, kept=4, empty=1, undecodable=1, duplicates=0)


def test_parquet_string_and_binary_columns(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({
        "text": pa.array(["a  owl", None, "a owl", "moon"], pa.string()),
        "raw": pa.array([b"x", b"\xff\xfe bad", None, b"y"], pa.binary()),
    })
    pq.write_table(table, path)
    prompts, stats = load_prompts(str(path))
    assert prompts == ["a owl", "moon"]
    assert stats == PromptStats(read=4, kept=2, empty=1, undecodable=0, duplicates=1)
    prompts, stats = load_prompts(str(path), column="raw")
    assert prompts == ["x", "y"]
    assert (stats.undecodable, stats.empty) == (1, 1)


# --- load_prompts: errors ----------------------------------------------------


def test_missing_column_lists_available_columns(tmp_path):
    csv_path = write_bytes(tmp_path / "p.csv", b"id,caption\n1,a cat\n")
    jsonl_path = write_bytes(tmp_path / "p.jsonl", b'{"id": 1, "caption": "a cat"}\n')
    parquet_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [1], "caption": ["a cat"]}), parquet_path)
    for source in (csv_path, jsonl_path, str(parquet_path)):
        with pytest.raises(PromptSourceError, match=r"no column 'text'; available columns: 'id', 'caption'"):
            load_prompts(source)


def test_parquet_non_string_column_is_refused(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(PromptSourceError, match="not strings"):
        load_prompts(str(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(PromptSourceError, match="no such prompt file") as missing:
        load_prompts(str(tmp_path / "absent.txt"))
    assert str(tmp_path / "absent.txt") in str(missing.value)
    with pytest.raises(PromptSourceError, match=r"unknown prompt file extension '\.tsv'; use .*\.parquet"):
        load_prompts(write_bytes(tmp_path / "p.tsv", b"a\n"))


def test_zero_usable_prompts_reports_counts(tmp_path):
    with pytest.raises(PromptSourceError, match=r"none of its 3 entries .* \(3 empty, 0 undecodable\)"):
        load_prompts(write_bytes(tmp_path / "blank.txt", b"\n  \n\t\n"))
    with pytest.raises(PromptSourceError, match=r"\(1 empty, 2 undecodable\); the source is not UTF-8 text"):
        load_prompts(write_bytes(tmp_path / "latin1.txt", b"caf\xe9\n\n\xff\xfe bad\n"))
    with pytest.raises(PromptSourceError, match="holds no prompts"):
        load_prompts(write_bytes(tmp_path / "empty.txt", b""))
    for error in PromptSourceError, ValueError:
        with pytest.raises(error):
            load_prompts(write_bytes(tmp_path / "empty.txt", b""))


def test_tfds_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(PromptSourceError, match=r'pip install "swiftbrush-jax\[tfds\]"'):
        load_prompts("tfds:coco_captions/2014:train:captions/text")


def test_tfds_source_parsing():
    spec = parse_tfds_source("tfds:coco_captions/2014:train[:1000]:captions/text")
    assert (spec.name, spec.split, spec.feature_path) == ("coco_captions/2014", "train[:1000]", ("captions", "text"))
    with pytest.raises(PromptSourceError, match="malformed TFDS source"):
        parse_tfds_source("tfds:coco_captions")


# --- PromptStream ------------------------------------------------------------

PROMPTS = [f"prompt {i}" for i in range(10)]


def test_each_epoch_covers_every_prompt_once():
    stream = PromptStream(PROMPTS, global_batch=5, seed=3)
    epochs = [stream.batch(2 * e) + stream.batch(2 * e + 1) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(PROMPTS)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert [stream.epoch_of(k) for k in range(5)] == [0, 0, 1, 1, 2]


def test_batches_run_across_epoch_boundaries():
    stream = PromptStream(PROMPTS, global_batch=4, seed=0)
    flat = [p for k in range(5) for p in stream.batch(k)]  # 20 positions = 2 epochs
    assert sorted(flat[:10]) == sorted(PROMPTS) and sorted(flat[10:]) == sorted(PROMPTS)
    wide = PromptStream(PROMPTS, global_batch=25, seed=0)  # one batch spans 2.5 epochs
    assert wide.batch(0)[:20] == flat
    assert next(wide.batches(1)) == wide.batch(1)


def test_batch_is_a_pure_function_of_prompts_seed_and_step():
    first = PromptStream(PROMPTS, global_batch=3, seed=11)
    seen = [first.batch(k) for k in range(12)]
    resumed = PromptStream(list(PROMPTS), global_batch=3, seed=11)
    assert [resumed.batch(k) for k in (7, 3, 11)] == [seen[7], seen[3], seen[11]]
    other_seed = PromptStream(PROMPTS, global_batch=3, seed=12)
    assert [other_seed.batch(k) for k in range(3)] != seen[:3]


def test_host_rows_concatenate_to_the_single_process_batch():
    single = PromptStream(PROMPTS, global_batch=6, seed=5)
    hosts = [PromptStream(PROMPTS, global_batch=6, seed=5, process_index=p, process_count=2) for p in range(2)]
    for k in range(6):
        rows = [host.batch(k) for host in hosts]
        assert all(len(r) == 3 for r in rows)
        assert rows[0] + rows[1] == single.batch(k)


def test_invalid_stream_arguments():
    with pytest.raises(ValueError, match="not divisible by process_count 4"):
        PromptStream(PROMPTS, global_batch=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index 2"):
        PromptStream(PROMPTS, global_batch=6, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream([], global_batch=6, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        PromptStream(PROMPTS, global_batch=6, seed=-1)


def test_state_and_check_resumable():
    stream = PromptStream(PROMPTS, global_batch=4, seed=7)
    saved = stream.state(5)
    assert {k: saved[k] for k in ("prompt_position", "num_prompts", "seed")} == \
        {"prompt_position": 20, "num_prompts": 10, "seed": 7}
    assert PromptStream(PROMPTS, global_batch=4, seed=7).check_resumable(saved) == 5
    with pytest.raises(ValueError, match=r"seed changed since the checkpoint \(7 -> 8\)"):
        PromptStream(PROMPTS, global_batch=4, seed=8).check_resumable(saved)
    with pytest.raises(ValueError, match=r"prompt set changed .*\(10 -> 9 prompts\)"):
        PromptStream(PROMPTS[:9], global_batch=4, seed=7).check_resumable(saved)
    with pytest.raises(ValueError, match="same count, different prompts"):
        PromptStream(PROMPTS[:9] + ["other"], global_batch=4, seed=7).check_resumable(saved)
    with pytest.raises(ValueError, match="not a multiple of the global batch 8"):
        PromptStream(PROMPTS, global_batch=8, seed=7).check_resumable(stream.state(1))


# --- Prefetcher --------------------------------------------------------------


def test_prefetcher_keeps_order():
    with Prefetcher(iter(range(50)), depth=2) as prefetched:
        assert list(prefetched) == list(range(50))
        assert next(prefetched, "done") == "done"


def test_prefetcher_reraises_worker_exception_after_earlier_items():
    def failing():
        yield "a"
        yield "b"
        raise RuntimeError("tokeniser broke")

    prefetched = Prefetcher(failing())
    assert next(prefetched) == "a"
    assert next(prefetched) == "b"
    with pytest.raises(RuntimeError, match="tokeniser broke"):
        next(prefetched)
    prefetched.close()


def test_prefetcher_close_stops_an_infinite_source():
    closed = threading.Event()
    produced = []

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    with Prefetcher(endless(), depth=2) as prefetched:
        assert next(prefetched) == 0
        time.sleep(0.05)
        assert len(produced) <= 4  # bounded read-ahead: depth items queued, one held by the worker
    assert closed.wait(2.0)  # the worker left the generator, which ran its cleanup
    count_after_close = len(produced)
    time.sleep(0.05)
    assert len(produced) == count_after_close
    assert next(prefetched, "done") == "done"
