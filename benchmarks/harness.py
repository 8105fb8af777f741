"""What every benchmark here shares: a description of the machine, steady-state timing, table and JSON output."""

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def limit_threads(n: Optional[int]) -> None:
    """Give both libraries the same intra-op thread budget; must run before JAX starts its backend.

    On a shared machine, threads that wait on each other's descheduled peers make
    multi-threaded CPU timings swing by 10x; one thread each keeps them comparable.
    """
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    xla = f"--xla_cpu_multi_thread_eigen={'false' if n == 1 else 'true'} intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla}".strip()


def hardware() -> Dict[str, object]:
    """Machine, accelerators and library versions, so numbers from different runs can be told apart."""
    import jax
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
    return info


def describe(hw: Dict[str, object]) -> str:
    """One line for the end of a table."""
    torch_on = hw.get("torch_device") or f"{hw['torch_threads']} CPU threads"
    load = "" if hw["load_average_1min"] is None else f" (load average {hw['load_average_1min']:.1f})"
    return (f"{hw['cpu']} x{hw['cpu_count']}{load}, jax {hw['jax']} on {hw['jax_device']}, "
            f"torch {hw['torch']} on {torch_on}")


def time_steady(run: Callable[[], None], warmup: int = 2, min_iters: int = 3, max_iters: int = 50,
                budget_s: float = 20.0) -> Dict[str, float]:
    """Seconds per call of ``run`` (which must block until its work is done) after ``warmup`` calls.

    The first call is timed on its own (it includes compilation for jitted code);
    then calls are timed one by one until ``budget_s`` is spent or ``max_iters`` reached.
    """
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        run()
    times: List[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "mean_s": statistics.fmean(times), "iters": len(times)}


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    """Right-aligned text table; floats are shown with 4 significant digits."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = [list(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
