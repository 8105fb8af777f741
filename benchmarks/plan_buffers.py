"""The step's per-device bytes where plan's CPU compile does not finish on this machine (SDXL): XLA's own buffer
assignment, read from its dump the moment it is written, then the compile stopped.

    python benchmarks/plan_buffers.py --json out.json -- --config configs/sdxl.py:lora --devices 1 --per-device-batch 1
    python benchmarks/plan_buffers.py --check     # the tiny step: the dump's figures against plan's memory_analysis

XLA's CPU compiler assigns buffers after its HLO passes and before code generation; at SDXL size the passes take
minutes and code generation hours. The assignment is what ``memory_analysis()`` reports from (``--check`` shows
the figures equal on the tiny step, where the compile finishes), so reading it early gives plan's numbers
without the wait. It is still the CPU proxy (plan.PROXY_NOTE), not a GPU's or TPU's allocation.
"""

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0**30
ALLOCATION = re.compile(r"allocation \d+: size (\d+), (.*)")


def allocation_bytes(path: str) -> dict:
    """Bytes of the step's allocations by role: arguments (donated or not), outputs that are not an argument's
    buffer, and the one preallocated scratch block."""
    out = {"argument_bytes": 0, "donated_bytes": 0, "output_only_bytes": 0, "temp_bytes": 0}
    with open(path) as f:
        for line in f:
            found = ALLOCATION.match(line)
            if not found:
                continue
            size, roles = int(found.group(1)), found.group(2)
            if "parameter" in roles:
                out["argument_bytes"] += size
                out["donated_bytes"] += size if "maybe-live-out" in roles else 0
            elif "maybe-live-out" in roles:
                out["output_only_bytes"] += size
            elif "preallocated-temp" in roles:
                out["temp_bytes"] += size
    out["total_bytes"] = out["argument_bytes"] + out["temp_bytes"] + out["output_only_bytes"]
    out["total_gib"] = out["total_bytes"] / GIB
    return out


def run_plan(plan_flags: list, dump: str, stop_early: bool, timeout_s: float) -> tuple:
    """(allocation bytes, seconds until the assignment was written, plan's return code or None when stopped)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_module_re=jit_train_step")
    proc = subprocess.Popen([sys.executable, "-m", "swiftbrush_jax.plan", *plan_flags], cwd=ROOT, env=env,
                            start_new_session=True)
    start = time.time()
    report = os.path.join(dump, "*jit_train_step.cpu_after_optimizations-memory-usage-report.txt")
    while not glob.glob(report):  # written after the assignment itself, so that file is complete
        if proc.poll() is not None:
            raise SystemExit(f"error: plan exited with {proc.returncode} before XLA assigned buffers")
        if time.time() - start > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"error: no buffer assignment after {timeout_s:.0f} s; raise --timeout-s")
        time.sleep(2)
    seconds = time.time() - start
    assignment = glob.glob(os.path.join(dump, "*jit_train_step.cpu_after_optimizations-buffer-assignment.txt"))[0]
    figures = allocation_bytes(assignment)
    if stop_early:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return figures, seconds, None
    return figures, seconds, proc.wait()


CHECKS = (("one device", ["--devices", "1"]),
          ("8 devices, FSDP 8", ["--devices", "8", "--config.mesh.fsdp=8", "--config.mesh.data=1",
                                 "--per-device-batch", "1"]))


def check() -> None:
    """On the tiny step the compile finishes: the dump's figures must be plan's memory_analysis figures, on one
    device and partitioned over eight."""
    for name, flags in CHECKS:
        with tempfile.TemporaryDirectory() as tmp:
            plan_json = os.path.join(tmp, "plan.json")
            figures, _, rc = run_plan(["--config", os.path.join(ROOT, "configs", "tiny.py"), *flags, "--json",
                                       plan_json], os.path.join(tmp, "dump"), stop_early=False, timeout_s=1800)
            assert rc == 0, rc
            with open(plan_json) as f:
                measured = json.load(f)["measurements"][0]
        pairs = {"argument_bytes": measured["argument_bytes"], "temp_bytes": measured["temp_bytes"],
                 "donated_bytes": measured["alias_bytes"], "total_bytes": measured["total_bytes"]}
        for field, theirs in pairs.items():
            print(f"{name}: {field}: dump {figures[field]}, memory_analysis {theirs}")
            assert figures[field] == theirs, (name, field)
    print("the dump's figures are memory_analysis's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures and the plan flags here")
    parser.add_argument("--check", action="store_true", help="compare with memory_analysis on the tiny step")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("plan_flags", nargs="*", help="after --: plan's own flags")
    args = parser.parse_args()
    if args.check:
        check()
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures, seconds, _ = run_plan(args.plan_flags, tmp, stop_early=True, timeout_s=args.timeout_s)
    record = {"plan_flags": args.plan_flags, **figures, "seconds_to_assignment": seconds,
              "note": "XLA's CPU buffer assignment of the step (plan's CPU proxy), read before code generation"}
    print(json.dumps(record, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
