"""benchmarks/shapes_table.py's record of scored runs: a run is reused only under the recipe it ran with, from
any clone, and a finished workdir of another recipe is refused, not scored as this one."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import shapes_table  # noqa: E402

import swiftbrush_jax  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(swiftbrush_jax.__file__))


def test_recipe_counts_package_paths_from_the_package():
    inside = {"teacher": os.path.join(PACKAGE, "toy", "teacher")}
    assert shapes_table.recipe(inside, 0) == shapes_table.recipe({"teacher": "swiftbrush_jax/toy/teacher"}, 0)
    assert shapes_table.recipe(inside, 0) != shapes_table.recipe({"teacher": "/elsewhere/teacher"}, 0)


def test_distillation_recipe_follows_the_config_its_overrides_seed_and_steps():
    base = shapes_table.distillation_recipe("", [], 0, 1200)
    assert base == shapes_table.distillation_recipe("", [], 0, 1200)
    others = {shapes_table.distillation_recipe("", ["--config.vsd.use_lora_teacher=False"], 0, 1200),
              shapes_table.distillation_recipe("", [], 1, 1200), shapes_table.distillation_recipe("", [], 0, 600),
              shapes_table.distillation_recipe("v2_b", [], 0, 1200)}
    assert base not in others and len(others) == 4


def test_recorded_runs_are_reused_only_under_their_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_table, "RUNS_JSON", str(tmp_path / "runs.json"))
    computed = []

    def compute():
        computed.append(1)
        return {"joint_accuracy": 0.5, "coverage_by_prompt": {"a circle": 0.25}, "images": [b"grid"]}

    record = shapes_table.load_runs(shapes_table.RUNS_JSON)
    result, images = shapes_table.recorded_or_run(record, "row/seed0", "aaaa", compute)
    assert images == [b"grid"] and result["recipe"] == "aaaa" and result["coverage_color_open"] == 0.25
    record = shapes_table.load_runs(shapes_table.RUNS_JSON)  # as a later session reads it
    assert shapes_table.recorded_or_run(record, "row/seed0", "aaaa", compute) == (record["runs"]["row/seed0"], None)
    assert shapes_table.recorded_or_run(record, "row/seed0", "bbbb", None) == (None, None)
    shapes_table.recorded_or_run(record, "row/seed0", "bbbb", compute)
    assert len(computed) == 2 and shapes_table.load_runs(shapes_table.RUNS_JSON)["runs"]["row/seed0"]["recipe"] == "bbbb"


def test_a_finished_workdir_of_another_recipe_is_refused(tmp_path):
    workdir = tmp_path / "shapes_swiftbrush_seed0"
    (workdir / "checkpoints" / "1200").mkdir(parents=True)
    with pytest.raises(SystemExit, match="error: .* holds a run of another recipe than aaaa"):
        shapes_table.train(str(tmp_path), "swiftbrush", "", [], 0, 1200, recipe_hash="aaaa")
    (workdir / "recipe").write_text("bbbb\n")
    with pytest.raises(SystemExit, match="another recipe"):
        shapes_table.train(str(tmp_path), "swiftbrush", "", [], 0, 1200, recipe_hash="aaaa")
    (workdir / "recipe").write_text("aaaa\n")
    assert shapes_table.train(str(tmp_path), "swiftbrush", "", [], 0, 1200, recipe_hash="aaaa") == (str(workdir), None)
