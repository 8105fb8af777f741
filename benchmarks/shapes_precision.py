"""Does the score precision change what a student learns? The shapes world with teacher and student in bf16.

    python benchmarks/shapes_precision.py run [ARM ...] [--seeds 3]   # distil and score (resumes)
    python benchmarks/shapes_precision.py table                       # the markdown table from the JSON

The recipe is configs/shapes.py as it was when these records were made (shapes_table.RECIPE_BEFORE_SEARCH:
student lr 2e-4, one LoRA update per step) with the LoRA teacher at the teacher's CFG (as configs/sd21.py)
and the teacher, text encoder and student computing in bf16, as the SD 2.1 configs do. The arms differ only in how
the four score evaluations of the VSD gradient compute (docs/bf16.md):

* all_bf16: the scores in bf16, like the rest of the step;
* default: the scores in float32 at ``score_precision="tensorfloat32"``, the default, as an NVIDIA GPU runs
  it (TF32: operands rounded to 10 significand bits, products summed in float32), emulated on the CPU;
* float32: the scores in float32 at ``highest``, exact (the old default);
* pair: the pair pass in bf16 (``score_pair=True``), the difference carried through the network.

In the arms that emulate a GPU, every float32 dot and convolution of the process is TF32, as a GPU's default
precision makes it; the CPU computes the float32 arm's exactly. Each (arm, training seed) is scored as
benchmarks/shapes_table.py scores its rows (held-out noise seed NOISE_SEED + 100 000 x seed, 8 images per
prompt and answer) and recorded in benchmarks/results/shapes_precision.json as soon as it is scored.
"""

import argparse
import os
import runpy
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes_table  # noqa: E402

from swiftbrush_jax.evaluators import shapes_suite  # noqa: E402

RESULTS_JSON = os.path.join(shapes_table.RESULTS, "shapes_precision.json")
METRICS = ("joint_accuracy", "coverage_distance", "frechet_distance", "pairwise_rms")
COMMON = {**shapes_table.RECIPE_BEFORE_SEARCH, "vsd.lora_guidance_scale": 3.0, "teacher_dtype": "bfloat16",
          "student_compute_dtype": "bfloat16"}
# arm -> (overrides of configs/shapes.py beyond COMMON, emulated matmul passes of float32 operands or "")
ARMS = {
    "all_bf16": ({"score_dtype": ""}, "tf32"),
    "default": ({"score_dtype": "float32", "score_precision": "tensorfloat32"}, "tf32"),
    "float32": ({"score_dtype": "float32", "score_precision": "highest"}, ""),
    "pair": ({"score_dtype": "bfloat16", "score_pair": True}, "tf32"),
}


def train_in_process(passes: str, train_argv: list) -> None:
    """``python -m swiftbrush_jax.train`` in this process, every float32 matmul traced as ``passes`` rounds it."""
    import bf16_vsd_gradients

    sys.argv = ["swiftbrush_jax.train"] + train_argv
    with bf16_vsd_gradients.accelerator_matmuls(passes):
        try:
            runpy.run_module("swiftbrush_jax.train", run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                raise


def run(results: dict, runs: str, arm: str, seed: int, steps: int) -> None:
    key = f"{arm}/seed{seed}"
    if key in results["runs"]:
        return
    overrides, passes = ARMS[arm]
    flags = [f"--config.{k}={v}" for k, v in {**COMMON, **overrides}.items()]
    # The trainer runs as this script's train-one subprocess, so the emulation wraps its tracing.
    trainer = (sys.executable, os.path.abspath(__file__), "train-one", passes or "none", "--")
    workdir, wall = shapes_table.train(runs, f"precision_{arm}", "", flags, seed, steps, trainer)
    result = shapes_suite.evaluate(workdir, seeds=8, noise_seed=shapes_suite.NOISE_SEED + 100_000 * seed)
    if seed == 0:
        shapes_suite.write_grid(os.path.join(shapes_table.RESULTS, f"shapes_precision_{arm}.png"),
                                result["images"], 8)
    results["runs"][key] = {"arm": arm, "seed": seed, "steps": steps, "overrides": {**COMMON, **overrides},
                            "emulated_matmuls": passes, "train_wall_s": wall,
                            **{m: result[m] for m in METRICS}, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    shapes_table.save_runs(RESULTS_JSON, results)
    print(key, {m: round(results["runs"][key][m], 3) for m in METRICS}, f"train {wall or 0:.0f} s", flush=True)


def table(results: dict) -> str:
    """One row per arm: mean ± standard deviation (ddof 1) over its recorded training seeds."""
    rows = []
    for arm in ARMS:
        recorded = [r for r in results["runs"].values() if r["arm"] == arm]
        if recorded:
            rows.append(shapes_table.summary(arm, f"{arm} ({len(recorded)} seeds)", recorded))
    return shapes_table.markdown(rows, METRICS)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-one"]:
        passes, rest = argv[1], argv[argv.index("--") + 1:]
        return train_in_process("" if passes == "none" else passes, rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("run", "table"))
    parser.add_argument("arms", nargs="*", help="default: all, in ARMS order")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--runs", default="runs/precision")
    args = parser.parse_args(argv)
    results = shapes_table.load_runs(RESULTS_JSON)
    if args.phase == "run":
        unknown = [a for a in args.arms if a not in ARMS]
        if unknown:
            raise SystemExit(f"error: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
        for seed in range(args.seeds):
            for arm in args.arms or ARMS:
                run(results, args.runs, arm, seed, args.steps)
    print(table(results))


if __name__ == "__main__":
    main()
