"""The paper's table (docs/method.md §7) at laptop scale, on the shipped shapes teacher, with error bars.

    python benchmarks/shapes_table.py [--runs runs] [--repeats 3] [--steps 1200] [--lora-updates 5]

Distils the shipped teacher with configs/shapes.py, --repeats times per row with
training seeds 0, 1, 2, ...: SwiftBrush, the plain-SDS ablation (no LoRA
teacher), the no-x0 ablation (student output taken as x0), the two
time-scale variant (--lora-updates LoRA-teacher updates per student update),
a LoRA teacher learning 3 times faster (lr 3e-3) at one update per step, and
SwiftBrush v2 (configs/shapes.py:v2_b: student B, a LoRA student with the
CLIP loss, also without it; student A is the SwiftBrush row; the merge of A and
B of each seed).
A finished workdir is reused, so an interrupted table resumes. Each repeat r is
evaluated on held-out noise seed NOISE_SEED + r (the teacher's rows too), so a
row's spread holds both training and sampling variance. Rows: teacher DDIM
with CFG, teacher in one step (x0 at T-1), the students and the merge in one step, and
true renders (the metrics' floor / ceiling). Writes
benchmarks/results/shapes_table.{md,json} and one grid PNG per row (repeat 0;
rows: prompts, the under-specified ones last; columns: seeds).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from swiftbrush_jax.evaluators import shapes_suite
from swiftbrush_jax.toy import shapes, teacher_arch, teacher_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.py")
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
        f"two_time_scale_{lora_updates}": ("", [f"--config.vsd.lora_updates_per_step={lora_updates}"]),
        "lora_lr_3e-3": ("", ["--config.lora_optimizer.lr=3e-3"]),
        "v2_b": ("v2_b", []),
        "v2_b_no_clip": ("v2_b", ["--config.vsd.clip_weight=0"]),  # what the CLIP loss does to student B
    }


# name -> (student A's row, student B's row, B's weight): SwiftBrush v2's merge of two students of one seed.
MERGES = {"v2_merged": ("swiftbrush", "v2_b", 0.5)}


TRAINER = (sys.executable, "-m", "swiftbrush_jax.train")


def train(runs: str, name: str, config_arg: str, overrides: list, seed: int, steps: int,
          trainer: tuple = TRAINER) -> tuple:
    """(workdir, wall seconds or None when reused) of one distillation; ``trainer``: the command that takes
    the trainer's flags."""
    workdir = os.path.join(runs, f"shapes_{name}_seed{seed}")
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
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
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" if k in row else "-" for k in columns]
        lines.append(f"| {row['description']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--repeats", type=int, default=3, help="training seeds per distilled row")
    parser.add_argument("--steps", type=int, default=0, help="distillation steps (0: the config's)")
    parser.add_argument("--lora-updates", type=int, default=5, help="the two time-scale row's LoRA updates per step")
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG of the teacher's DDIM row (0: the config's)")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt and answering (colour, shape)")
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    from swiftbrush_jax.config_base import load_config_file

    config = load_config_file(CONFIG)
    steps = args.steps or config.total_steps
    guidance = args.guidance or config.vsd.guidance_scale
    rows = {"teacher_ddim": dict(model=teacher_path(), steps=args.ddim_steps, guidance=guidance),
            "teacher_1step": dict(model=teacher_path(), steps=1)}
    distilled = distillations(args.lora_updates)
    rows.update(distilled)
    rows.update(MERGES)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name, spec in rows.items():
        if args.only and name not in args.only:
            continue
        repeats, description = [], name
        for r in range(args.repeats):
            if isinstance(spec, dict):
                result = shapes_suite.evaluate(seeds=args.seeds, noise_seed=shapes_suite.NOISE_SEED + 100_000 * r, **spec)
                description = result["description"]
            elif name in MERGES:
                a, b, weight = spec
                folder = merge(args.runs, f"shapes_{name}_seed{r}", train(args.runs, a, *distilled[a], r, steps)[0],
                               train(args.runs, b, *distilled[b], r, steps)[0], weight)
                result = shapes_suite.evaluate(folder, steps=1, seeds=args.seeds, noise_seed=shapes_suite.NOISE_SEED + 100_000 * r)
                result.update(train_seed=r, train_steps=steps)
                description = f"{name}: {1 - weight:g} {a} + {weight:g} {b}, 1 step"
            else:
                workdir, wall = train(args.runs, name, *spec, r, steps)
                result = shapes_suite.evaluate(workdir, seeds=args.seeds, noise_seed=shapes_suite.NOISE_SEED + 100_000 * r)
                result.update(train_seed=r, train_steps=steps, train_wall_s=wall)
                description = f"{name} ({steps} steps), 1 step"
            if r == 0:
                shapes_suite.write_grid(os.path.join(args.out, f"shapes_{name}.png"), result["images"], args.seeds)
            result.pop("images")
            result.update(coverage_by_kind(result["coverage_by_prompt"]))
            print(name, r, shapes_suite.markdown_table([result]).splitlines()[-1], flush=True)
            repeats.append(result)
        results.append(summary(name, description, repeats))
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
