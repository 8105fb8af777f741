"""The paper's table (docs/method.md §7) at laptop scale, on the shipped shapes teacher, with error bars.

    python benchmarks/shapes_table.py [--runs runs] [--repeats 3] [--steps 1200] [--lora-updates 1]
    python benchmarks/shapes_table.py --recorded   # the table of what is recorded so far; runs nothing

Distils the shipped teacher with configs/shapes.py, --repeats times per row with
training seeds 0, 1, 2, ...: SwiftBrush, the plain-SDS ablation (no LoRA
teacher), the no-x0 ablation (student output taken as x0), the recipe with
--lora-updates LoRA-teacher updates per student update instead of its own,
a LoRA teacher learning 3 times faster (lr 3e-3), and
SwiftBrush v2 (configs/shapes.py:v2_b: student B, a LoRA student with the
CLIP loss, also without it; student A is the SwiftBrush row; the merge of A and
B of each seed).
Each scored run is recorded in benchmarks/results/shapes_table_runs.json with
the recipe it ran under (the resolved config, overrides, seed and steps), so the
table resumes across machines and sessions and reruns only what a changed
recipe touches; a finished workdir of the same recipe is reused too (its file ``recipe`` says which). The runs go seed by seed,
every row of seed 0 first. Each repeat r is
evaluated on held-out noise seed NOISE_SEED + 100000 r (the teacher's rows too), so a
row's spread holds both training and sampling variance. Rows: teacher DDIM
with CFG, teacher in one step (x0 at T-1), the students and the merge in one step, and
true renders (the metrics' floor / ceiling). Writes
benchmarks/results/shapes_table.{md,json} when every run is scored, and one grid PNG per row as its
repeat 0 is scored (rows: prompts, the under-specified ones last; columns: seeds).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

import swiftbrush_jax
from swiftbrush_jax.config_base import load_config_file
from swiftbrush_jax.evaluators import shapes_suite
from swiftbrush_jax.toy import shapes, teacher_arch, teacher_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUNS_JSON = os.path.join(RESULTS, "shapes_table_runs.json")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.py")
# configs/shapes.py's recipe before docs/shapes_search.md chose five LoRA updates at student lr 5e-5: the base of
# the search's settings and of the precision benchmark, whose records were made with it.
RECIPE_BEFORE_SEARCH = {"student_optimizer.lr": 2e-4, "vsd.lora_updates_per_step": 1}
COLUMNS = ("color_accuracy", "shape_accuracy", "joint_accuracy", "coverage_distance", "open_prompt_accuracy",
           "pairwise_rms", "frechet_distance")
# coverage_distance split by what the prompt leaves open: "a circle" (colour), "a red shape" (shape), "a shape"
COVERAGE_COLUMNS = ("coverage_color_open", "coverage_shape_open", "coverage_both_open")


def distillations(lora_updates: int) -> dict:
    """name -> (config argument, config overrides) of each distilled row."""
    return {
        "swiftbrush": ("", []),
        "sds_ablation": ("", ["--config.vsd.use_lora_teacher=False"]),
        "no_x0_ablation": ("", ["--config.vsd.student_x0_parameterization=False"]),
        f"lora_updates_{lora_updates}": ("", [f"--config.vsd.lora_updates_per_step={lora_updates}"]),
        "lora_lr_3e-3": ("", ["--config.lora_optimizer.lr=3e-3"]),
        "v2_b": ("v2_b", []),
        "v2_b_no_clip": ("v2_b", ["--config.vsd.clip_weight=0"]),  # what the CLIP loss does to student B
    }


# name -> (student A's row, student B's row, B's weight): SwiftBrush v2's merge of two students of one seed.
MERGES = {"v2_merged": ("swiftbrush", "v2_b", 0.5)}


TRAINER = (sys.executable, "-m", "swiftbrush_jax.train")


def train(runs: str, name: str, config_arg: str, overrides: list, seed: int, steps: int,
          trainer: tuple = TRAINER, recipe_hash: str = "") -> tuple:
    """(workdir, wall seconds or None when reused) of one distillation; ``trainer``: the command that takes
    the trainer's flags. With ``recipe_hash`` the workdir keeps it in a file ``recipe``, and a finished
    workdir of another recipe is refused rather than reused."""
    workdir = os.path.join(runs, f"shapes_{name}_seed{seed}")
    recipe_file = os.path.join(workdir, "recipe")
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        if recipe_hash and (not os.path.exists(recipe_file) or open(recipe_file).read().strip() != recipe_hash):
            raise SystemExit(f"error: {workdir} holds a run of another recipe than {recipe_hash}; move it away or "
                             "pass another --runs")
        print(f"reusing {workdir}", flush=True)
        return workdir, None
    config = CONFIG + (f":{config_arg}" if config_arg else "")
    cmd = [*trainer, "--config", config, "--workdir", workdir,
           f"--config.seed={seed}", f"--config.total_steps={steps}", f"--config.checkpoint_every={steps}"] + overrides
    os.makedirs(workdir, exist_ok=True)
    print("running", " ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(workdir, "train.log"), "a") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed; see {log.name}")
    if recipe_hash:
        with open(recipe_file, "w") as f:
            f.write(recipe_hash + "\n")
    return workdir, time.time() - start


def load_runs(path: str) -> dict:
    """A resumable search's record of scored runs (``{"runs": {key: record}}``), empty when not yet written."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}}


def save_runs(path: str, results: dict) -> None:
    """Written whole to a temporary file and renamed, so an interrupted write loses no recorded run."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=float)
        f.write("\n")
    os.replace(tmp, path)


def recipe(*parts) -> str:
    """A short hash of what a run depends on; paths inside the package count from the package, so a clone
    elsewhere gets the same hash."""
    package = os.path.dirname(os.path.abspath(swiftbrush_jax.__file__))

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [portable(v) for v in value]
        return value.replace(package, "swiftbrush_jax") if isinstance(value, str) else value

    text = json.dumps(portable(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def distillation_recipe(config_arg: str, overrides: list, seed: int, steps: int) -> str:
    """The recipe of one distillation: the resolved config (configs/shapes.py with its variant), the row's
    overrides, the training seed and steps."""
    return recipe(load_config_file(CONFIG, config_arg or None).to_dict(), overrides, seed, steps)


def recorded_or_run(record: dict, key: str, fingerprint: str, compute) -> tuple:
    """(result, images or None): the recorded result of ``key`` when it ran under ``fingerprint``, else
    ``compute()``'s, recorded at once; (None, None) when it is not recorded and ``compute`` is None."""
    previous = record["runs"].get(key)
    if previous is not None and previous.get("recipe") == fingerprint:
        print(f"recorded {key}", flush=True)
        return previous, None
    if compute is None:
        return None, None
    result = compute()
    images = result.pop("images")
    result.update(recipe=fingerprint, **coverage_by_kind(result["coverage_by_prompt"]))
    record["runs"][key] = result
    save_runs(RUNS_JSON, record)
    return result, images


def merge(runs: str, name: str, a: str, b: str, weight: float) -> str:
    """The exported folder of ``swiftbrush_jax.merge`` between two workdirs (reused when it exists)."""
    out = os.path.join(runs, name)
    if not os.path.exists(os.path.join(out, "model_index.json")):
        cmd = [sys.executable, "-m", "swiftbrush_jax.merge", "--weight", str(weight), "--out", out, a, b]
        print("running", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def truth_result(seeds: int, size_px: int, repeat: int) -> dict:
    """True renders from other seeds, scored like a model: what a perfect generator gets."""
    prompts = shapes.all_prompts()
    counts = shapes_suite.images_per_prompt(prompts, seeds)
    images = shapes_suite.rendered_truth(prompts, counts, size_px, seed=shapes_suite.TRUE_IMAGES_SEED + 5_000 + 100 * repeat)
    scores = shapes_suite.score_suite(images, prompts, counts)
    return {"description": "true renders (reference)", **scores, **coverage_by_kind(scores["coverage_by_prompt"]),
            "images": shapes_suite.grid_images(images, counts, seeds)}


def coverage_by_kind(coverage_by_prompt: dict) -> dict:
    """The mean coverage distance of the prompts that leave the colour open, the shape open, and both."""
    kinds = {key: [] for key in COVERAGE_COLUMNS}
    for prompt, distance in coverage_by_prompt.items():
        color, shape = shapes.parse_caption(prompt)
        kinds[COVERAGE_COLUMNS[2] if color is None and shape is None else
              COVERAGE_COLUMNS[0] if color is None else COVERAGE_COLUMNS[1]].append(distance)
    return {key: float(np.mean(values)) for key, values in kinds.items() if values}


def summary(name: str, description: str, repeats: list) -> dict:
    """Mean and standard deviation (ddof 1) of each column over the repeats."""
    out = {"name": name, "description": description, "repeats": repeats}
    for key in COLUMNS + COVERAGE_COLUMNS:
        values = [r[key] for r in repeats if key in r]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1
                        else float("nan"), "values": values}
    return out


def markdown(rows: list, columns: tuple) -> str:
    head = "| row | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1)
    lines = [head]
    for row in rows:
        cells = ["-" if k not in row else f"{row[k]['mean']:.3f}" if np.isnan(row[k]["std"]) else
                 f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in columns]
        lines.append(f"| {row['description']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--repeats", type=int, default=3, help="training seeds per distilled row")
    parser.add_argument("--steps", type=int, default=0, help="distillation steps (0: the config's)")
    parser.add_argument("--lora-updates", type=int, default=1,
                        help="LoRA-teacher updates per student update of the row that changes the recipe's")
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG of the teacher's DDIM row (0: the config's)")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt and answering (colour, shape)")
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--recorded", action="store_true",
                        help="print the table of the runs recorded under the present recipe; run nothing")
    args = parser.parse_args(argv)

    config = load_config_file(CONFIG)
    steps = args.steps or config.total_steps
    guidance = args.guidance or config.vsd.guidance_scale
    rows = {"teacher_ddim": dict(model=teacher_path(), steps=args.ddim_steps, guidance=guidance),
            "teacher_1step": dict(model=teacher_path(), steps=1)}
    distilled = distillations(args.lora_updates)
    rows.update(distilled)
    rows.update(MERGES)
    os.makedirs(args.out, exist_ok=True)
    names = [name for name in rows if not args.only or name in args.only]
    record = load_runs(RUNS_JSON)
    repeats = {name: [] for name in names}
    descriptions = dict(zip(names, names))
    for r in range(args.repeats):
        noise_seed = shapes_suite.NOISE_SEED + 100_000 * r
        for name in names:
            spec = rows[name]
            if isinstance(spec, dict):
                fingerprint = recipe(spec, args.seeds, noise_seed)

                def compute():
                    return shapes_suite.evaluate(seeds=args.seeds, noise_seed=noise_seed, **spec)
            elif name in MERGES:
                a, b, weight = spec
                trained = {row: distillation_recipe(*distilled[row], r, steps) for row in (a, b)}
                fingerprint = recipe(trained[a], trained[b], weight, args.seeds, noise_seed)
                descriptions[name] = f"{name}: {1 - weight:g} {a} + {weight:g} {b}, 1 step"

                def compute():
                    workdirs = [train(args.runs, row, *distilled[row], r, steps, recipe_hash=trained[row])[0]
                                for row in (a, b)]
                    folder = merge(args.runs, f"shapes_{name}_seed{r}", *workdirs, weight)
                    return {**shapes_suite.evaluate(folder, steps=1, seeds=args.seeds, noise_seed=noise_seed),
                            "train_seed": r, "train_steps": steps}
            else:
                trained = distillation_recipe(*spec, r, steps)
                fingerprint = recipe(trained, args.seeds, noise_seed)
                descriptions[name] = f"{name} ({steps} steps), 1 step"

                def compute():
                    workdir, wall = train(args.runs, name, *spec, r, steps, recipe_hash=trained)
                    return {**shapes_suite.evaluate(workdir, seeds=args.seeds, noise_seed=noise_seed),
                            "train_seed": r, "train_steps": steps, "train_wall_s": wall}
            result, images = recorded_or_run(record, f"{name}/seed{r}", fingerprint,
                                             None if args.recorded else compute)
            if result is None:
                continue
            if isinstance(spec, dict):
                descriptions[name] = result["description"]
            if r == 0 and images is not None:
                shapes_suite.write_grid(os.path.join(args.out, f"shapes_{name}.png"), images, args.seeds)
            print(name, r, shapes_suite.markdown_table([result]).splitlines()[-1], flush=True)
            repeats[name].append(result)
    if args.recorded:
        described = {name: f"{descriptions[name]} [{len(repeats[name])} of {args.repeats} seeds]" for name in names}
        rows_so_far = [summary(name, described[name], repeats[name]) for name in names if repeats[name]]
        print(markdown(rows_so_far, COLUMNS) + "\n" + markdown(rows_so_far, COVERAGE_COLUMNS))
        return
    results = [summary(name, descriptions[name], repeats[name]) for name in names]
    if not args.only:
        truth = [truth_result(args.seeds, teacher_arch.IMAGE_PX, r) for r in range(args.repeats)]
        shapes_suite.write_grid(os.path.join(args.out, "shapes_truth.png"), truth[0].pop("images"), args.seeds)
        for t in truth[1:]:
            t.pop("images")
        results.append(summary("truth", "true renders (reference)", truth))
    table = markdown(results, COLUMNS) + "\n" + markdown(results, COVERAGE_COLUMNS)
    print(table)
    suffix = "" if not args.only else "_" + "_".join(args.only)
    with open(os.path.join(args.out, f"shapes_table{suffix}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, f"shapes_table{suffix}.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True, default=lambda x: float(x) if np.isscalar(x) else str(x))
        f.write("\n")


if __name__ == "__main__":
    main()
