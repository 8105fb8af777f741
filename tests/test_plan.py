"""The planning command: compiles the tiny VSD step on simulated devices and reports its cost."""

import json
import os
import re
import subprocess
import sys

import pytest

from swiftbrush_jax.plan import hbm_overflow, search_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """The tiny step on 2 simulated devices, data parallel: every device holds the whole state."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "tiny.py"),
           "--devices", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_prints_cost_and_memory_table(tiny_plan):
    stdout, _ = tiny_plan
    for field in ("TFLOP/dev", "args GiB", "temp GiB", "total GiB", "compile s", "mesh data=2 x fsdp=1",
                  "tiny random teacher", "proxy", "model FLOPs per step"):
        assert field in stdout, field


def test_json_holds_one_measurement_per_device(tiny_plan):
    _, report = tiny_plan
    assert report["devices"] == 2 and report["mesh"] == {"data": 2, "fsdp": 1}
    (m,) = report["measurements"]
    assert m["per_device_batch"] == 2 and m["global_batch"] == 4  # configs/tiny.py: batch 4 over 2 devices
    assert m["flops_per_device"] > 0 and m["argument_bytes"] > 0 and m["compile_s"] > 0
    assert m["total_bytes"] == m["argument_bytes"] + m["temp_bytes"] + m["output_bytes"] - m["alias_bytes"]
    assert m["alias_bytes"] > 0  # the train state is donated
    assert report["model_flops_per_step"] > 0 and report["model_flops_global_batch"] == 4


def adapter_floats(unet, rank, suffixes):
    """Parameters of rank-`rank` LoRA adapters (down and up) on a PyTorch UNet's linear layers named *suffix."""
    import torch

    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(suffixes))


@pytest.fixture(scope="module")
def tiny_state_bytes():
    """(train state + frozen inputs, token ids per sample) in bytes for configs/tiny.py, counted from the
    PyTorch models of the same architecture: student, EMA and Adam's two moments of the UNet, the LoRA
    (rank 4 on every to_q and to_v) with its two moments, the frozen teacher and text encoder in float32, the
    empty-prompt embedding, and the scalars (step, two skip counters, the RNG key, two Adam counts)."""
    import tempfile

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from swiftbrush_jax.models import presets
    from swiftbrush_jax.files.diffusers_writer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_clip_tokenizer(tmp, presets.TINY_CORPUS)
    unet = UNet2DConditionModel(**presets.TINY_UNET)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, **presets.TINY_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())
    lora = adapter_floats(unet, 4, (".to_q", ".to_v"))
    tokens, width = text.config.max_position_embeddings, text.config.hidden_size
    floats = 4 * count(unet) + 3 * lora + count(unet) + count(text) + tokens * width
    return 4 * floats + 4 * 3 + 8 + 4 * 2, 4 * tokens


def test_argument_bytes_are_the_state_counted_independently(tiny_plan, tiny_state_bytes):
    """Data parallel, each device holds the whole state and frozen inputs and its 2 rows of token ids."""
    _, report = tiny_plan
    (m,) = report["measurements"]
    state, ids_per_sample = tiny_state_bytes
    assert m["argument_bytes"] == state + m["per_device_batch"] * ids_per_sample


def test_resident_only_shows_what_a_lora_student_saves(tmp_path):
    """--resident-only compiles nothing; a LoRA student's state holds its adapters where a whole student's holds
    the UNet (student, EMA and Adam's two moments of each), counted from the PyTorch UNet of the tiny config."""
    from diffusers import UNet2DConditionModel

    from swiftbrush_jax.models import presets

    def plan(name, *overrides):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "tiny.py"),
               "--resident-only", "--json", str(out), *overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "nothing compiled" in proc.stdout and "total GiB" not in proc.stdout
        return json.loads(out.read_text())

    whole = plan("whole")
    lora = plan("lora", "--config.student_lora.rank=4", "--config.student_lora.alpha=4")
    assert whole["measurements"] == lora["measurements"] == [] and lora["student_lora_rank"] == 4
    unet = UNet2DConditionModel(**presets.TINY_UNET)
    unet_floats = sum(p.numel() for p in unet.parameters())
    adapters = adapter_floats(unet, 4, (".to_q", ".to_k", ".to_v", ".to_out.0"))
    assert whole["state_bytes"] - lora["state_bytes"] == 4 * 4 * (unet_floats - adapters)
    assert whole["frozen_bytes"] == lora["frozen_bytes"] and whole["sampler_bytes"] == lora["sampler_bytes"]


def test_resident_counts_the_clip_loss_towers(tmp_path):
    """With the CLIP loss on (configs/sd21_v2.py:b, no folders on disk: CLIP ViT-B/32 and TAESD's architectures),
    plan's frozen inputs grow by both towers in bfloat16, counted from transformers' CLIPModel and diffusers'
    AutoencoderTiny built from the same configs; the state and the sampler's inputs do not change."""
    import torch
    from diffusers import AutoencoderTiny
    from transformers import CLIPConfig, CLIPModel

    from swiftbrush_jax.models import presets

    def plan(name, *overrides):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "sd21_v2.py:b"),
               "--resident-only", "--json", str(out), "--config.clip_decoder=taesd", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads(out.read_text())

    printed, with_clip = plan("clip")
    _, without = plan("no_clip", "--config.vsd.clip_weight=0")
    assert "CLIP loss: CLIP ViT-B/32 (models.presets), decoded by TAESD (models.presets)" in printed
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(text_config=presets.CLIP_VIT_B32["text_config"],
                                    vision_config=presets.CLIP_VIT_B32["vision_config"],
                                    projection_dim=presets.CLIP_VIT_B32["projection_dim"]))
        taesd = AutoencoderTiny()
    towers = sum(p.numel() for name, p in clip.named_parameters() if name != "logit_scale")
    towers += sum(p.numel() for p in taesd.parameters())
    assert with_clip["frozen_bytes"] - without["frozen_bytes"] == 2 * towers
    assert with_clip["state_bytes"] == without["state_bytes"] and with_clip["sampler_bytes"] == without["sampler_bytes"]


def test_tpu_topology_is_compiled_by_the_tpu_compiler(tmp_path):
    """--topology compiles for a TPU slice without one (libtpu ahead of time): a v5e 2x2 with FSDP over 4."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "tiny.py"),
           "--topology", "v5e:2x2", "--config.mesh.fsdp=4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TPU v5 lite (v5e:2x2, compiled by libtpu)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["backend"] == "tpu" and report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4}
    (m,) = report["measurements"]
    assert m["per_device_batch"] == 1 and m["global_batch"] == 4 and m["flops_per_device"] > 0
    assert m["alias_bytes"] > 0
    assert m["total_bytes"] == m["argument_bytes"] + m["temp_bytes"] + m["output_bytes"] - m["alias_bytes"]
    assert m["argument_bytes"] > 0  # TPU layouts tile small arrays (8 x 128): the tiny state's bytes say little here


def test_a_step_too_big_for_the_chip_is_reported_not_raised(tmp_path):
    """The TPU compiler refuses a step larger than the chip's memory; the plan reports what it needs and goes on."""
    out = tmp_path / "plan.json"
    # 128x128 latents: each sample's attention scores alone take GiBs (the tiny config attends in one call).
    cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "tiny.py"),
           "--topology", "v5e:1x1", "--config.latent_size=128", "--per-device-batch", "16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"per-device batch 16 does not fit: the TPU compiler needs at least [\d.]+ GiB, "
                     r"the chip has 15\.75 GiB", proc.stdout), proc.stdout
    report = json.loads(out.read_text())
    (refused,) = report["does_not_fit"]
    assert report["measurements"] == [] and refused["per_device_batch"] == 16
    assert refused["needed_bytes"] > refused["capacity_bytes"] > 15 * 2**30
    assert report["model_flops_per_step"] > 0


def test_tpu_out_of_memory_messages_are_read():
    old = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 21.95G of 15.48G hbm.")
    new = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (67.04G) "
           "exceeds available HBM (15.75G).")
    assert hbm_overflow(old) == (int(21.95 * 2**30), int(15.48 * 2**30))
    assert hbm_overflow(new) == (int(67.04 * 2**30), int(15.75 * 2**30))
    assert hbm_overflow("INTERNAL: something else") is None


def test_unknown_topology_is_one_line_and_exit_2():
    cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "tiny.py"),
           "--topology", "v5e-8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --topology 'v5e-8': write a TPU slice as")


def test_batch_search_finds_the_largest_batch_on_a_linear_cost():
    compiled = []

    def total_at(batch):
        compiled.append(batch)
        return 10 + 3 * batch

    search = search_batch(total_at, budget_bytes=50, start=4, max_compiles=4)
    assert search.largest_measured_fit == 13 and search.fit_estimate == 13
    assert search.fit_bytes_per_sample == pytest.approx(3) and search.fit_fixed_bytes == pytest.approx(10)
    assert len(compiled) <= 5


def test_batch_search_when_nothing_fits():
    search = search_batch(lambda b: 100 + b, budget_bytes=50, start=2, max_compiles=3)
    assert search.largest_measured_fit is None and search.fit_estimate == 0


def test_batch_search_tries_only_multiples_of_the_microbatch_count():
    compiled = []

    def total_at(batch):
        compiled.append(batch)
        return 10 + 3 * batch

    search = search_batch(total_at, budget_bytes=50, start=4, max_compiles=4, multiple=4)
    assert all(b % 4 == 0 for b in compiled) and search.largest_measured_fit == 12
    assert search_batch(lambda b: 100 + b, budget_bytes=50, start=8, max_compiles=3, multiple=4).fit_estimate == 0


def test_batch_not_divisible_into_microbatches_is_one_line_and_exit_2():
    cmd = [sys.executable, "-m", "swiftbrush_jax.plan", "--config", os.path.join(REPO, "configs", "tiny.py"),
           "--per-device-batch", "3", "--config.microbatches=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: per-device batch 3 is not divisible by microbatches=2; "
                                                    "use a multiple of 2")
