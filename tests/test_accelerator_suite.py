"""benchmarks/accelerator_suite.py's CPU path: the command a first GPU runs, on the tiny pipeline, end to end."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_suite_tiny_path_writes_its_json(tmp_path):
    out = tmp_path / "suite.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_suite.py"), "--tiny", "--json", str(out),
           "--variants", "default", "default_cudnn_attention", "--batches", "8", "2", "--seconds", "0.2",
           "--one-step-batches", "2", "--workdir", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    default, cudnn = result["train_step"]
    # The largest batch that fits is found from the top; on the CPU every batch fits, so the first is taken.
    assert default["variant"] == "default" and default["batch"] == 8 and default["images_s"] > 0
    assert default["score_matmuls"] == "float32 on cpu" and default["model_flops"] > 0
    assert cudnn == {"variant": "default_cudnn_attention", "skipped": "cuDNN attention needs an NVIDIA GPU"}
    (one_step,) = result["one_step"]
    assert one_step["batch"] == 2 and one_step["ours_ms"] > 0 and one_step["diffusers_ms"] > 0
