"""A full-size rehearsal on one machine: the real trainer on SD 2.1-base-sized weights, then diffusers.

    python benchmarks/full_size_rehearsal.py [--root /tmp/full_size_rehearsal] [--memory-limit-gib 22] \
        [--json out.json] [--config configs/sd21.py] [--config.key=value ...]

SD 2.1-base's UNet, text encoder and VAE are built with random weights from
their real configs (``swiftbrush_jax.models.presets``) by diffusers and
transformers and saved as safetensors, as a downloaded teacher is. Then, each
phase its own process as a user would run it, ``--config`` unchanged except for
the teacher, a prompt file and a small latent (the weights, optimizer states and
program are full size; the activations are not). The default config is
SwiftBrush v2's LoRA student (``configs/sd21_v2.py:b``, CLIP loss off): the
paper's whole float32 student (``configs/sd21.py``) does not fit 24 GiB on the
CPU backend (docs/performance.md, "A full-size rehearsal"); a larger machine can pass it.

1. For each of ``--devices`` (default 1): ``train`` 2 steps (per-device batch 1; on N > 1 simulated
   CPU devices with FSDP N), checkpoint; ``train`` again to step 3: it resumes.
2. ``export`` the last run to a diffusers folder; diffusers' ``StableDiffusionPipeline``
   loads it and its one-step images are compared with ``swiftbrush_jax.sample``'s.

Each phase reports its peak host memory (the process's maximum resident set),
and the training phases the trainer's own compile time and the seconds of a
step after compilation. A watchdog kills a phase whose memory passes
``--memory-limit-gib`` (the machine must survive it), and the script fails.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import cpu_model  # noqa: E402
from benchmarks.pipelines import REPO  # noqa: E402

GIB = 2.0**30
# What fits 24 GiB: SwiftBrush v2's LoRA student (rank 256) on the SD 2.1 teacher, VSD only. The paper's whole
# float32 student (configs/sd21.py) needs about 28 GiB at any latent size on the CPU backend (docs/performance.md).
DEFAULT_CONFIG, DEFAULT_OVERRIDES = "configs/sd21_v2.py:b", ("--config.vsd.clip_weight=0",)
PROMPTS = ("a photo of a cat", "a painting of a lighthouse at dusk", "an astronaut riding a horse",
           "a bowl of fruit on a table")


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of a process and its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return total


def run_phase(name: str, args, limit_gib: float, env=None) -> dict:
    """Run one phase as its own process under the memory watchdog; its output, wall time and peak RSS."""
    print(f"[{name}] {' '.join(args)}", flush=True)
    t = time.time()
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = []

    def watch():
        while proc.poll() is None:
            if tree_rss_bytes(proc.pid) > limit_gib * GIB:
                killed.append(tree_rss_bytes(proc.pid))
                proc.kill()
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith("\r") and "%|" not in line:
            print(f"  {line.rstrip()}", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    output = "".join(lines)
    if killed:
        raise SystemExit(f"error: phase {name} passed the {limit_gib} GiB watchdog ({killed[0] / GIB:.1f} GiB) and "
                         f"was killed; free memory, or run fewer --devices")
    if proc.returncode != 0:
        raise SystemExit(f"error: phase {name} exited with {proc.returncode}:\n{output[-3000:]}")
    result = {"phase": name, "wall_s": round(time.time() - t, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2)}
    print(f"[{name}] {result['wall_s']} s, peak RSS {result['peak_rss_gib']} GiB", flush=True)
    return result | {"output": output}


def trainer_timings(output: str) -> dict:
    """The trainer's own figures from its log: compile times, time to the first step, seconds a step."""
    found = lambda pattern: [float(m) for m in re.findall(pattern, output)]
    step_rates = found(r"steps_per_s=([0-9.eE+-]+)")
    return {
        "compile_step_s": found(r"compiled the train step in ([0-9.]+) s")[-1],
        "compile_sampler_s": (found(r"compiled the sampler in ([0-9.]+) s") or [None])[-1],
        "first_step_after_s": found(r"first step done ([0-9.]+) s after start")[-1],
        "step_s": round(1.0 / step_rates[-1], 2) if step_rates and step_rates[-1] > 0 else None,
        "resumed": "resumed from step" in output,
    }


def train_args(config: str, overrides: list, workdir: str, teacher: str, prompts: str, latent: int, batch: int,
               steps: int, fsdp: int) -> list:
    return [sys.executable, "-m", "swiftbrush_jax.train", "--config", config, "--workdir", workdir,
            *overrides, f"--config.teacher={teacher}", f"--config.prompts={prompts}", f"--config.latent_size={latent}",
            f"--config.batch_size={batch}", f"--config.total_steps={steps}", "--config.checkpoint_every=2",
            "--config.log_every=1", f"--config.mesh.fsdp={fsdp}"]


def compare_with_diffusers(workdir: str, exported: str, latent: int) -> dict:
    """One-step images of the workdir's student by ``swiftbrush_jax.sample`` and of the exported folder by
    diffusers, same prompts and noise; their largest pixel difference."""
    import torch
    from diffusers import StableDiffusionPipeline

    from swiftbrush_jax import sample

    latents = np.random.RandomState(0).randn(len(PROMPTS), 4, latent, latent).astype(np.float32)
    model = sample.load_sampling_model(workdir)
    ours = sample.BatchedSampler(model, batch_size=len(PROMPTS))(PROMPTS, latents.transpose(0, 2, 3, 1))
    del model
    pipe = StableDiffusionPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(list(PROMPTS), latents=torch.from_numpy(latents), num_inference_steps=1, guidance_scale=0.0,
                      height=latent * 8, width=latent * 8, output_type="np").images
    return {"images": list(ours.shape), "max_abs_diff_255": round(float(np.abs(ours - theirs).max()) * 255, 4),
            "mean_abs_diff_255": round(float(np.abs(ours - theirs).mean()) * 255, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Further --config.key=value flags go to the trainer.")
    parser.add_argument("--root", default="/tmp/full_size_rehearsal", help="pipeline, workdirs and export go here")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="training config (file[:arg])")
    parser.add_argument("--devices", type=int, nargs="+", default=[1],
                        help="one training run per count: 1 device, or N simulated CPU devices with FSDP N "
                             "(on 24 GiB even 2 did not fit: docs/performance.md)")
    parser.add_argument("--latent-size", type=int, default=8, help="latent side (pixels / 8)")
    parser.add_argument("--memory-limit-gib", type=float, default=22.0, help="kill a phase past this resident size")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--compare", nargs=2, metavar=("WORKDIR", "EXPORTED"), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if any(not a.startswith("--config.") for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if not a.startswith('--config.'))}")
    args.override = list(DEFAULT_OVERRIDES if args.config == DEFAULT_CONFIG else ()) + extra
    if args.compare:  # the last phase, in its own process
        print("COMPARE " + json.dumps(compare_with_diffusers(*args.compare, args.latent_size)), flush=True)
        return

    os.makedirs(args.root, exist_ok=True)
    # The random teacher is kept for the next rehearsal; the compilation cache is not: compiles are measured cold.
    for old in ["exported", "jax_cache"] + [f"run_{'1_device' if n == 1 else f'fsdp_{n}'}" for n in args.devices]:
        shutil.rmtree(os.path.join(args.root, old), ignore_errors=True)
    limit, latent, phases = args.memory_limit_gib, args.latent_size, []
    teacher = os.path.join(args.root, "sd21")
    code = f"import sys; sys.path.insert(0, {REPO!r}); from benchmarks.pipelines import pipeline_folder; " \
           f"pipeline_folder('sd21', {args.root!r})"
    phases.append(run_phase("write_random_sd21", [sys.executable, "-c", code], limit))
    prompts = os.path.join(args.root, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("".join(f"{p}, study {i}\n" for i in range(8) for p in PROMPTS))

    # The resumed runs load the step compiled by the first run from JAX's persistent cache.
    cache = {"JAX_COMPILATION_CACHE_DIR": os.path.join(args.root, "jax_cache")}
    for n in args.devices:
        label = "1_device" if n == 1 else f"fsdp_{n}"
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        env, batch, fsdp = ({}, 1, 1) if n == 1 else ({"XLA_FLAGS": flags}, n, n)
        workdir = os.path.join(args.root, f"run_{label}")
        for steps in (2, 3):
            phase = run_phase(f"train_{label}_to_step_{steps}",
                              train_args(args.config, args.override, workdir, teacher, prompts, latent, batch, steps,
                                         fsdp), limit, env | cache)
            phases.append(phase | trainer_timings(phase["output"]))
        if not phases[-1]["resumed"]:
            raise SystemExit(f"error: the second {label} run did not resume from its checkpoint")

    exported = os.path.join(args.root, "exported")  # of the last run
    phases.append(run_phase("export", [sys.executable, "-m", "swiftbrush_jax.export", "--workdir", workdir,
                                       "--out", exported], limit))
    phase = run_phase("diffusers_loads_export", [sys.executable, os.path.abspath(__file__), "--latent-size",
                                                str(latent), "--compare", workdir, exported], limit)
    phases.append(phase | json.loads(re.search(r"^COMPARE (.*)$", phase["output"], re.M).group(1)))

    import jax

    report = {"machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__},
              "latent_size": latent, "devices": args.devices, "config": args.config, "overrides": args.override,
              "phases": [{k: v for k, v in p.items() if k != "output"} for p in phases]}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
