"""A planned search for the shapes-world regime where VSD's LoRA teacher keeps the teacher's diversity.

    python benchmarks/shapes_search.py prune            # one training seed per setting, in SETTINGS order
    python benchmarks/shapes_search.py final NAME ...   # 3 training seeds of each finalist and of its SDS twin
    python benchmarks/shapes_search.py teacher          # the 25-step teacher, 3 noise seeds, scored as the runs
    python benchmarks/shapes_search.py plot             # benchmarks/results/shapes_search.png and a table
    python benchmarks/shapes_search.py grids NAME       # NAME's seed-0 grid beside its SDS twin's and the teacher's

Every run is recorded in benchmarks/results/shapes_search.json as soon as it is scored, keyed by setting
and training seed, so an interrupted search resumes where it stopped and a new setting appended to SETTINGS
extends it. A setting is overrides of the recipe the search started from (configs/shapes.py with
shapes_table.RECIPE_BEFORE_SEARCH, student lr 2e-4 and one LoRA update; the search chose the config's
present recipe, slr5e-5_lu5); its SDS twin is the same setting with
``vsd.use_lora_teacher=False`` and without the LoRA teacher's own keys (which SDS does not use), so settings
that differ only in LoRA settings share one twin. Runs are scored as benchmarks/shapes_table.py scores its
rows: held-out noise seed NOISE_SEED + training seed, 8 images per prompt and answer.

The axes (docs/shapes.md, "The search"): the student's learning rate against the LoRA teacher's, with the
steps scaled so the student moves about as far; LoRA updates per student update together with a smaller
student rate; the teacher's CFG; the LoRA rank.
"""

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes_table  # noqa: E402

from swiftbrush_jax.config_base import load_config_file  # noqa: E402
from swiftbrush_jax.evaluators import shapes_suite  # noqa: E402
from swiftbrush_jax.toy import teacher_path  # noqa: E402

RESULTS_JSON = os.path.join(shapes_table.RESULTS, "shapes_search.json")
METRICS = ("joint_accuracy", "coverage_distance", "frechet_distance", "pairwise_rms", "open_prompt_accuracy")
# Keys that only the LoRA teacher reads: an SDS twin drops them.
LORA_KEYS = ("lora_optimizer.", "lora.", "vsd.lora_updates_per_step", "vsd.lora_guidance_scale")

# name -> (total steps, overrides of the search's base recipe). The student's Adam moves each weight by about lr per
# step, so a rate halved takes twice the steps to move as far as the 2e-4 x 1200 baseline.
SETTINGS = {
    "base": (1200, {}),
    "cfg2": (1200, {"vsd.guidance_scale": 2.0}),
    "cfg1.5": (1200, {"vsd.guidance_scale": 1.5}),
    "slr1e-4": (2400, {"student_optimizer.lr": 1e-4}),
    "rank32": (1200, {"lora.rank": 32, "lora.alpha": 32 * 108.0 / 64}),
    "slr1e-4_lu2": (2000, {"student_optimizer.lr": 1e-4, "vsd.lora_updates_per_step": 2}),
    "cfg2_slr1e-4": (2400, {"vsd.guidance_scale": 2.0, "student_optimizer.lr": 1e-4}),
    "lora_cfg_teacher": (1200, {"vsd.lora_guidance_scale": 3.0}),
    "slr5e-5_lu3": (2400, {"student_optimizer.lr": 5e-5, "vsd.lora_updates_per_step": 3}),
    # The LoRA teacher's rate raised instead of its updates multiplied: the same tracking for no extra time.
    "slr1e-4_llr3e-3": (2400, {"student_optimizer.lr": 1e-4, "lora_optimizer.lr": 3e-3}),
    "cfg1.5_llr3e-3": (1200, {"vsd.guidance_scale": 1.5, "lora_optimizer.lr": 3e-3}),
    "slr1e-4_lu5": (1200, {"student_optimizer.lr": 1e-4, "vsd.lora_updates_per_step": 5}),
    # Five LoRA updates gained accuracy when the student's rate was halved (the shapes table's two time-scale
    # row at 2e-4: joint 0.718; slr1e-4_lu5's seeds 0 and 1: 0.847) at the same coverage: halved once more.
    "slr5e-5_lu5": (1200, {"student_optimizer.lr": 5e-5, "vsd.lora_updates_per_step": 5}),
    # The chosen setting with one LoRA change: rows of the present shapes table (TABLE_ROWS).
    "slr5e-5_lu1": (1200, {"student_optimizer.lr": 5e-5, "vsd.lora_updates_per_step": 1}),
    "slr5e-5_lu5_llr3e-3": (1200, {"student_optimizer.lr": 5e-5, "vsd.lora_updates_per_step": 5,
                                   "lora_optimizer.lr": 3e-3}),
}


# The setting configs/shapes.py now is: the shapes table's swiftbrush and sds_ablation rows are it and its twin.
CHOSEN = "slr5e-5_lu5"
# Settings that are a row of the shapes table with the present recipe (configs/shapes.py plus that row's change,
# trained and scored as this search trains and scores): imported from shapes_table_runs.json, not run twice.
TABLE_ROWS = {"slr5e-5_lu1": "lora_updates_1", "slr5e-5_lu5_llr3e-3": "lora_lr_3e-3"}


def sds_twin(overrides: dict) -> dict:
    return {**{k: v for k, v in overrides.items() if not k.startswith(LORA_KEYS)}, "vsd.use_lora_teacher": False}


def twin_name(name: str) -> str:
    """The SDS twin's name: shared by settings whose overrides agree once the LoRA keys are dropped."""
    steps, overrides = SETTINGS[name]
    key = sorted(sds_twin(overrides).items())
    for other, (other_steps, other_overrides) in SETTINGS.items():
        if other_steps == steps and sorted(sds_twin(other_overrides).items()) == key:
            return f"sds_{other}"
    raise AssertionError(name)


def spec(name: str) -> tuple:
    """(steps, overrides of configs/shapes.py) of a setting or of an ``sds_<setting>`` twin."""
    steps, overrides = SETTINGS[name[4:] if name.startswith("sds_") else name]
    overrides = {**shapes_table.RECIPE_BEFORE_SEARCH, **overrides}
    return steps, sds_twin(overrides) if name.startswith("sds_") else overrides


def score(results: dict, runs: str, name: str, seed: int, model: str, **sampling) -> dict:
    """Score a model on held-out noise seed NOISE_SEED + 100000 x seed (each image its own seed's noise), record
    it under name/seed and keep the seed-0 grid in runs/search_<name>.png."""
    result = shapes_suite.evaluate(model, seeds=8, noise_seed=shapes_suite.NOISE_SEED + 100_000 * seed, **sampling)
    images = result.pop("images")
    if seed == 0:
        os.makedirs(runs, exist_ok=True)
        shapes_suite.write_grid(os.path.join(runs, f"search_{name}.png"), images, 8)
    record = {"setting": name, "seed": seed, **{m: result[m] for m in METRICS},
              "coverage_by_prompt": result["coverage_by_prompt"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results["runs"][f"{name}/seed{seed}"] = record
    shapes_table.save_runs(RESULTS_JSON, results)
    print(f"{name}/seed{seed}", {m: round(record[m], 3) for m in METRICS}, flush=True)
    return record


def run(results: dict, runs: str, name: str, seed: int) -> dict:
    """Distil and score one (setting, seed), or return its recorded result."""
    key = f"{name}/seed{seed}"
    if key in results["runs"]:
        return results["runs"][key]
    steps, overrides = spec(name)
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    workdir, wall = shapes_table.train(runs, f"search_{name}", "", flags, seed, steps)
    record = score(results, runs, name, seed, workdir)
    record.update(steps=steps, overrides=overrides, train_wall_s=wall)
    shapes_table.save_runs(RESULTS_JSON, results)
    print(key, f"train {wall or 0:.0f} s", flush=True)
    return record


def score_teacher(results: dict, runs: str, seeds: int) -> None:
    """The 25-step teacher at the recipe's CFG on the same held-out noise as the runs of each training seed
    (replacing rows imported from the shapes table, which drew their noise differently)."""
    guidance = load_config_file(shapes_table.CONFIG).vsd.guidance_scale
    for seed in range(seeds):
        recorded = results["runs"].get(f"teacher/seed{seed}")
        if recorded is None or "source" in recorded:
            score(results, runs, "teacher", seed, teacher_path(), steps=25, guidance=guidance)


def config_is(name: str) -> bool:
    """Whether configs/shapes.py is the setting's recipe (its steps and every override), so that the present
    shapes table's rows are that setting with one change."""
    config = load_config_file(shapes_table.CONFIG)
    steps, overrides = spec(name)
    return config.total_steps == steps and all(
        functools.reduce(getattr, key.split("."), config) == value for key, value in overrides.items())


def import_table(results: dict) -> None:
    """The base setting and its SDS twin from the shapes table of that recipe
    (shapes_before_search/shapes_table.json: its swiftbrush and sds_ablation rows, seeds 0-2), scored with one
    noise array per evaluation; its teacher_ddim row until the teacher phase rescores it; and the TABLE_ROWS
    settings from the present shapes table's runs, which this search would train and score the same way."""
    with open(os.path.join(shapes_table.RESULTS, "shapes_before_search", "shapes_table.json")) as f:
        rows = {row["name"]: row for row in json.load(f)}
    imported = [(setting, seed, f"shapes_table.json:{row}", repeat)
                for setting, row in (("teacher", "teacher_ddim"), ("base", "swiftbrush"), ("sds_base", "sds_ablation"))
                for seed, repeat in enumerate(rows[row]["repeats"])]
    if config_is(CHOSEN):  # otherwise the table's rows are another recipe's
        table_runs = shapes_table.load_runs(shapes_table.RUNS_JSON)["runs"]
        imported += [(setting, record["train_seed"], f"shapes_table_runs.json:{key}", record)
                     for setting, row in TABLE_ROWS.items() for key, record in sorted(table_runs.items())
                     if key.startswith(f"{row}/")]
    for setting, seed, source, record in imported:
        key = f"{setting}/seed{seed}"
        if key not in results["runs"]:
            results["runs"][key] = {"setting": setting, "seed": seed, "source": source,
                                    **{m: record[m] for m in METRICS},
                                    "coverage_by_prompt": record.get("coverage_by_prompt")}
            if setting in TABLE_ROWS:
                results["runs"][key].update(steps=record["train_steps"], overrides=spec(setting)[1],
                                            train_wall_s=record["train_wall_s"])
    shapes_table.save_runs(RESULTS_JSON, results)


# Label offsets (points) where settings crowd one place; the rest: SDS below its point, VSD above.
LABEL_OFFSETS = {"sds_base": (8, 1), "cfg1.5_llr3e-3": (8, -12), "rank32": (-52, 7), "lora_cfg_teacher": (-92, -12),
                 "cfg1.5": (5, -11), "slr1e-4_llr3e-3": (5, -11), "sds_slr1e-4_lu5": (-112, 3),
                 "slr5e-5_lu1": (6, -12)}


def results_targets(teacher_records: list) -> dict:
    """The issue's targets from the teacher's seeds: joint accuracy >= 90% of its mean, coverage distance within
    0.10 of it, Fréchet distance within 1.25x of it."""
    mean = {m: float(np.mean([r[m] for r in teacher_records])) for m in METRICS}
    return {"joint_accuracy": 0.9 * mean["joint_accuracy"], "coverage_distance": mean["coverage_distance"] + 0.1,
            "frechet_distance": 1.25 * mean["frechet_distance"]}


def plot(results: dict, out: str) -> None:
    """coverage_distance against joint accuracy: one point per setting (mean over its seeds, bars where more
    than one), VSD and SDS in two colours, the teacher marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    by_setting = {}
    for record in results["runs"].values():
        by_setting.setdefault(record["setting"], []).append(record)
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    for name, records in sorted(by_setting.items()):
        x = np.array([r["joint_accuracy"] for r in records])
        y = np.array([r["coverage_distance"] for r in records])
        colour = "black" if name == "teacher" else "tab:red" if name.startswith("sds_") else "tab:blue"
        marker = "*" if name == "teacher" else "s" if name.startswith("sds_") else "o"
        err = dict(xerr=x.std(ddof=1), yerr=y.std(ddof=1), capsize=3) if len(records) > 1 else {}
        ax.errorbar(x.mean(), y.mean(), fmt=marker, color=colour, markersize=12 if name == "teacher" else 7, **err)
        offset = LABEL_OFFSETS.get(name, (5, -11) if name.startswith("sds_") else (5, 4))
        ax.annotate(f"{name} ({len(records)})", (x.mean(), y.mean()), textcoords="offset points", xytext=offset,
                    fontsize=7)
    targets = results_targets(by_setting["teacher"])
    ax.set_xlim(right=max(1.02, ax.get_xlim()[1]))
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    ax.add_patch(matplotlib.patches.Rectangle((targets["joint_accuracy"], bottom), right - targets["joint_accuracy"],
                                              targets["coverage_distance"] - bottom, color="tab:green", alpha=0.12,
                                              lw=0))
    ax.text(targets["joint_accuracy"] + 0.003, bottom + 0.004, "targets: joint >= 90% of the teacher's,\n"
            "coverage within 0.10 of it", fontsize=7, va="bottom")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.scatter([], [], marker="o", color="tab:blue", label="VSD (LoRA teacher)")
    ax.scatter([], [], marker="s", color="tab:red", label="SDS twin (no LoRA teacher)")
    ax.scatter([], [], marker="*", color="black", s=120, label="teacher, DDIM 25 steps")
    ax.set_xlabel("joint accuracy (higher is better)")
    ax.set_ylabel("coverage distance (lower is better)")
    ax.set_title("Shapes world: one-step students, one point per setting (n seeds); bars: std over seeds",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    print("wrote", out)


def table(results: dict) -> str:
    """A markdown row per setting: seeds, mean ± std (over seeds, where more than one) of each metric, and the
    training wall time per run."""
    by_setting = {}
    for record in results["runs"].values():
        by_setting.setdefault(record["setting"], []).append(record)
    lines = ["| setting | steps | seeds | joint accuracy | coverage distance | Fréchet distance | pairwise RMS "
             "| training s/run |", "|---|---|---|---|---|---|---|---|"]
    for name, records in sorted(by_setting.items(), key=lambda item: (item[0] != "teacher", item[0])):
        cells = []
        for metric in ("joint_accuracy", "coverage_distance", "frechet_distance", "pairwise_rms"):
            values = np.array([r[metric] for r in records])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        walls = [r["train_wall_s"] for r in records if r.get("train_wall_s")]
        wall = f"{np.mean(walls):.0f}" if walls else ""
        lines.append(f"| {name} | {records[0].get('steps', '')} | {len(records)} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def grids(runs: str, name: str, out: str) -> None:
    """The seed-0 grids of a setting, its SDS twin and the teacher side by side (rows: the 28 prompts, the
    open ones last; columns: 8 noise seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    def grid(setting: str, table_row: str) -> str:
        """The search's seed-0 grid of a setting; for CHOSEN and its twin, else the shapes table's (the same
        run: seed 0, the same held-out noise)."""
        path = os.path.join(runs, f"search_{setting}.png")
        if os.path.exists(path) or setting not in (CHOSEN, twin_name(CHOSEN), "teacher"):
            return path
        return os.path.join(shapes_table.RESULTS, f"shapes_{table_row}.png")

    panels = [(grid(name, "swiftbrush"), f"VSD: {name}"),
              (grid(twin_name(name), "sds_ablation"), f"SDS twin: {twin_name(name)}"),
              (grid("teacher", "teacher_ddim"), "teacher, DDIM 25 steps")]
    images = [np.asarray(Image.open(path)) for path, _ in panels]
    fig, axes = plt.subplots(1, 3, figsize=(3 * images[0].shape[1] / 100, images[0].shape[0] / 100 + 0.4), dpi=100)
    for ax, image, (_, title) in zip(axes, images, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=16)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    print("wrote", out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("prune", "final", "teacher", "plot", "grids"))
    parser.add_argument("names", nargs="*", help="prune: settings (default all); final: the finalists; grids: one")
    parser.add_argument("--runs", default="runs/search")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of a finalist")
    args = parser.parse_args(argv)
    results = shapes_table.load_runs(RESULTS_JSON)
    if args.phase == "plot":
        plot(results, os.path.join(shapes_table.RESULTS, "shapes_search.png"))
        print(table(results))
        return
    unknown = [n for n in args.names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if args.phase == "grids":
        grids(args.runs, args.names[0], os.path.join(shapes_table.RESULTS, "shapes_search_grids.png"))
        return
    import_table(results)
    if args.phase == "teacher":
        score_teacher(results, args.runs, args.seeds)
    elif args.phase == "prune":
        for name in args.names or SETTINGS:
            run(results, args.runs, name, 0)
    else:
        for name in args.names:
            for seed in range(args.seeds):
                run(results, args.runs, name, seed)
                run(results, args.runs, twin_name(name), seed)


if __name__ == "__main__":
    main()
