"""How far the plan's CPU memory proxy is from the TPU compiler, on one program small enough to compile here.

    python benchmarks/plan_backends.py [--batches 2 4] [--topology v5p:1x1x1] [--out benchmarks/results]

The program is the SD 2.1 train step of configs/sd21.py (but with 512-query
attention blocks) cut to its two top UNet levels at full width (320 and 640
channels at 64x64 latents, one layer per block, the 5- and 10-head
attentions) and a 2-layer text encoder: the part
whose activations grow with the batch. Its component configs are written to a
folder and passed as the teacher, so the plan builds it exactly like SD 2.1.
Each (backend, batch) is one ``python -m swiftbrush_jax.plan`` process: XLA
for a simulated CPU device, and libtpu for ``--topology`` (needs libtpu).
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

from swiftbrush_jax.models import presets
from swiftbrush_jax.files.diffusers_writer import write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0**30


def write_proxy_configs(root: str) -> None:
    """SD 2.1-base's config.json files with the UNet cut to its top two levels and a 2-layer text encoder."""
    configs = copy.deepcopy(presets.SD21_BASE)
    configs["unet"].update(block_out_channels=[320, 640], attention_head_dim=[5, 10], layers_per_block=1,
                           down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    configs["text_encoder"]["num_hidden_layers"] = 2
    for name, config in configs.items():
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        os.makedirs(os.path.join(root, name), exist_ok=True)
        write_json(os.path.join(root, name, filename), config)


def plan(teacher: str, batch: int, topology: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        target = ["--topology", topology] if topology else ["--devices", "1"]
        cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "sd21.py"),
               f"--config.teacher={teacher}", "--config.attention_query_block=512",  # as in docs/performance.md
               "--per-device-batch", str(batch), "--json", out] + target
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"plan failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--topology", default="v5p:1x1x1", help="TPU slice for libtpu; empty: CPU only")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as teacher:
        write_proxy_configs(teacher)
        for backend in ["cpu"] + ([args.topology] if args.topology else []):
            for batch in args.batches:
                report = plan(teacher, batch, "" if backend == "cpu" else backend)
                (m,) = report["measurements"]
                rows.append({"backend": backend, "device_kind": report["device_kind"], **m})
                print(f"{backend:>12}  batch {batch}: args {m['argument_bytes'] / GIB:.3f} GiB, "
                      f"temp {m['temp_bytes'] / GIB:.3f} GiB, compile {m['compile_s']:.0f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan_backends.json"), "w") as f:
        json.dump({"program": "SD 2.1 step, top two UNet levels, 2-layer text encoder, configs/sd21.py",
                   "rows": rows}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
