"""Load on the server: 200 requests from 16 concurrent clients on loopback, against the batch figure of
benchmarks/inference.py measured in the same run on the same model.

    python benchmarks/serve_load.py [--model swiftbrush_jax/toy/teacher] [--json benchmarks/results/serve_load.json]

The server (python -m swiftbrush_jax.serve, its default batch sizes 1 2 4 8 and
queue of 64) runs as its own process; each client sends its requests one after
another, each a different (prompt, seed). The run is bounded (``--timeout``)
and fails unless every request was answered 200. A diffusers folder is served
in one step (``--steps 1``: one UNet call at t = T - 1), which is what
inference.py's ``ours`` computes, so the two figures are the same model's.
After the server has stopped, inference.py's ``ours`` is timed at the
server's largest batch in this process.
"""

import argparse
import collections
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import jax.numpy as jnp

from harness import describe, hardware, time_steady, write_json
from inference import ours, prompts_of
from swiftbrush_jax import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(model: str, extra, timeout: float):
    """The server process and its port, once /healthz answered 200."""
    proc = subprocess.Popen([sys.executable, "-m", "swiftbrush_jax.serve", "--model", model, "--port", "0", *extra],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        print(line, end="", file=sys.stderr)
        match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
        if match:
            port = int(match.group(1))
            break
    else:
        raise SystemExit(f"error: the server exited ({proc.wait()}) before listening")
    threading.Thread(target=lambda: [print(line, end="", file=sys.stderr) for line in proc.stderr],
                     daemon=True).start()
    while get(port, "/healthz", 10)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("error: the server never became ready")
        time.sleep(0.5)
    return proc, port


def get(port: int, target: str, timeout: float):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", target)
        response = conn.getresponse()
        out = response.status, response.read(), dict(response.getheaders())
        conn.close()
        return out
    except OSError as e:
        return None, str(e).encode(), {}


def load(port: int, requests: int, clients: int, timeout: float):
    """(latencies in s, statuses, batch sizes, wall seconds) of ``requests`` spread over ``clients`` threads."""
    prompts = prompts_of(requests)
    jobs = list(range(requests))
    lock = threading.Lock()
    latencies, statuses, batches = [], collections.Counter(), collections.Counter()
    deadline = time.monotonic() + timeout

    def client():
        while time.monotonic() < deadline:
            with lock:
                if not jobs:
                    return
                i = jobs.pop(0)
            query = urllib.parse.urlencode({"prompt": prompts[i], "seed": i})
            start = time.perf_counter()
            status, _, headers = get(port, "/image.png?" + query, max(1.0, deadline - time.monotonic()))
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses[status] += 1
                batches[headers.get("X-Batch-Size")] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, batches, time.perf_counter() - start


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=toy.teacher_path(), help="a diffusers folder (default: the shapes teacher)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole load, start-up apart")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget of inference.py's figure")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    proc, port = start_server(args.model, ["--steps", "1"], timeout=900)
    try:
        health = json.loads(get(port, "/healthz", 10)[1])
        get(port, "/image.png?prompt=warm&seed=0", 60)
        latencies, statuses, batches, wall = load(port, args.requests, args.clients, args.timeout)
    finally:
        proc.terminate()
        proc.wait(60)
    answered = statuses.get(200, 0)
    batch = max(health["batch_sizes"])
    run = ours(args.model, jnp.float32)
    prompts = prompts_of(batch)
    timing = time_steady(lambda: run(prompts), budget_s=args.seconds)
    row = {
        "model": args.model if not args.model.startswith(REPO) else os.path.relpath(args.model, REPO),
        "requests": args.requests, "clients": args.clients, "answered_200": answered,
        "statuses": {str(k): v for k, v in statuses.items()},
        "batch_sizes_seen": {str(k): v for k, v in sorted(batches.items(), key=lambda kv: str(kv[0]))},
        "wall_s": wall, "images_per_s": answered / wall,
        "latency_p50_ms": 1e3 * statistics.median(latencies), "latency_p95_ms": 1e3 * percentile(latencies, 95),
        "latency_max_ms": 1e3 * max(latencies),
        "inference_batch": batch, "inference_batch_ms": 1e3 * timing["median_s"],
        "inference_images_per_s": batch / timing["median_s"],
    }
    row["served_fraction_of_inference"] = row["images_per_s"] / row["inference_images_per_s"]
    hw = hardware()
    for key, value in row.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"hardware: {describe(hw)}")
    if args.json:
        write_json(args.json, {"benchmark": "serve_load", "hardware": hw, "rows": [row]})
    if answered != args.requests:
        raise SystemExit(f"error: {args.requests - answered} of {args.requests} requests were not answered 200")


if __name__ == "__main__":
    main()
