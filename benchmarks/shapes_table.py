"""The paper's table (docs/method.md §7) at laptop scale, on the shipped shapes teacher.

    python benchmarks/shapes_table.py [--runs runs] [--main-steps 600] [--ablation-steps 120]

Trains (or reuses the workdirs of) three distillations with configs/shapes.py:
SwiftBrush, the plain-SDS ablation (no LoRA teacher) and the no-x0
ablation (student output taken as x0); the three run side by side. Then
evaluates on held-out noise seeds, against true renders from held-out seeds:
teacher DDIM with CFG, teacher in one step (x0 at T-1), the three students
in one step, and the true renders themselves (the metrics' ceiling / floor).
Writes benchmarks/results/shapes_table.{md,json} and one grid PNG per row
(rows: prompts, columns: seeds).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from swiftbrush_jax import evaluate as ev
from swiftbrush_jax.toy import shapes, teacher_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.py")
DISTILLATIONS = {  # name -> config overrides
    "swiftbrush": [],
    "sds_ablation": ["--config.vsd.use_lora_teacher=False"],
    "no_x0_ablation": ["--config.vsd.student_x0_parameterization=False"],
}


def has_checkpoint(workdir: str, steps: int) -> bool:
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def train_missing(runs: str, steps: dict) -> dict:
    """Start every distillation whose workdir lacks its final checkpoint, side by side; wall seconds each."""
    procs, walls = {}, {}
    for name, overrides in DISTILLATIONS.items():
        workdir = os.path.join(runs, f"shapes_{name}")
        if has_checkpoint(workdir, steps[name]):
            print(f"reusing {workdir}", flush=True)
            continue
        cmd = [sys.executable, "-m", "swiftbrush_jax.train", "--config", CONFIG, "--workdir", workdir,
               f"--config.total_steps={steps[name]}", f"--config.checkpoint_every={steps[name]}"] + overrides
        os.makedirs(workdir, exist_ok=True)
        log = open(os.path.join(workdir, "train.log"), "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log)
        print("started", " ".join(cmd), flush=True)
    for name, (proc, start, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed; see {log.name}")
        walls[name] = time.time() - start
        log.close()
    return walls


def truth_row(prompts, seeds: int, size_px: int) -> dict:
    """True renders from other seeds, scored like a model: what a perfect generator gets."""
    images = ev.rendered_truth(prompts, seeds, size_px, seed=ev.TRUE_IMAGES_SEED + 5_000)
    return {"description": "true renders (reference)", "steps": 0,
            **ev.score_suite(images, prompts, seeds), "images": images}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--main-steps", type=int, default=1500)
    parser.add_argument("--ablation-steps", type=int, default=1500)
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG of the teacher's DDIM row")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    steps = {"swiftbrush": args.main_steps, "sds_ablation": args.ablation_steps, "no_x0_ablation": args.ablation_steps}
    walls = train_missing(args.runs, steps)

    rows = {
        "teacher_ddim": dict(model=teacher_path(), steps=args.ddim_steps, guidance=args.guidance),
        "teacher_1step": dict(model=teacher_path(), steps=1),
    }
    for name in DISTILLATIONS:
        rows[name] = dict(model=os.path.join(args.runs, f"shapes_{name}"))
    os.makedirs(args.out, exist_ok=True)
    prompts = shapes.all_prompts()
    results = {}
    for name, kwargs in rows.items():
        result = ev.evaluate(seeds=args.seeds, **kwargs)
        if name in steps:
            result["description"] = f"{name} ({steps[name]} steps), 1 step"
            result["train_steps"] = steps[name]
            result["train_wall_s"] = walls.get(name)
        results[name] = result
        print(ev.table_row(result), flush=True)
    results["truth"] = truth_row(prompts, args.seeds, results["teacher_1step"]["images"].shape[1])

    lines = [ev.table_header()]
    for name, result in results.items():
        ev.write_grid(os.path.join(args.out, f"shapes_{name}.png"), result.pop("images"), args.seeds)
        lines.append(ev.table_row(result))
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(args.out, "shapes_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "shapes_table.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True, default=lambda x: float(x) if np.isscalar(x) else str(x))
        f.write("\n")


if __name__ == "__main__":
    main()
