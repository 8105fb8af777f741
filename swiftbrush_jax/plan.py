"""Plan a training run before renting accelerators: compile the VSD step and read its cost.

    python -m swiftbrush_jax.plan --config configs/sd21.py --devices 8 --config.mesh.fsdp=8 \
        [--per-device-batch 16] [--memory-gib 16] [--json plan.json] [--config.key=value ...]
    python -m swiftbrush_jax.plan --config configs/sd21.py --topology v5e:2x4 --config.mesh.fsdp=8
    python -m swiftbrush_jax.plan --config configs/sd21_v2.py:b --devices 8 --config.mesh.fsdp=8 --resident-only

The step is built exactly as the trainer builds it (``setup.build_vsd``, the
sharding rule table, the same jit shardings and donation) but from abstract
parameters (``jax.ShapeDtypeStruct``), so no SD-size weight is ever allocated.
It is compiled for ``--devices`` simulated CPU devices; XLA then reports the
FLOPs of one step and the bytes each device holds. With ``--memory-gib`` it
also searches for the largest per-device batch that fits. With ``--resident-only``
it compiles nothing and reports what the trainer keeps on each device between
steps (train state, frozen inputs, sampler inputs), which is exact, not a proxy.

XLA's CPU memory analysis is a proxy for TPU/GPU memory: the buffer
assignment differs by backend (fusion, layouts, bf16 handling), so treat the
numbers as an estimate, good for comparing settings, not as a guarantee.
With ``--topology`` the step is compiled ahead of time by the TPU compiler
itself (libtpu, ``pip install libtpu``; no TPU needed) for that slice, and the
bytes are what that TPU would allocate; a batch too large for the chip is
reported with the bytes the compiler says it needs, not raised.
"""

import dataclasses
import json
import os
import re
import tempfile
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from . import setup
from .errors import UsageError
from .parallel import sharding


_DEVICES = flags.DEFINE_integer("devices", 1, "Number of simulated CPU devices.")
_BATCH = flags.DEFINE_integer("per-device-batch", None, "Per-device batch; default: config.batch_size / devices.")
_MEMORY = flags.DEFINE_float("memory-gib", None, "Per-device memory budget in GiB: search the largest batch that fits.")
_COMPILES = flags.DEFINE_integer("search-compiles", 4, "At most this many extra compiles for the batch search.")
_JSON = flags.DEFINE_string("json", None, "Also write the plan to this JSON file.")
_RESIDENT_ONLY = flags.DEFINE_bool(
    "resident-only", False, "Report only what the trainer keeps on each device between steps (seconds, no compile): "
    "enough to compare train states, e.g. a LoRA student against a whole one.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Compile for this TPU slice instead of simulated CPU devices, e.g. v5e:2x4 (a v5e-8) or "
    "v5p:1x1x1 (one chip): the TPU compiler's own memory figures. Needs libtpu (pip install libtpu), not a TPU.")

GIB = 2.0**30
PLAN_XLA_FLAGS = (
    # The plan never runs the step, so machine-code quality is irrelevant: these three halve the compile
    # time of the tiny step and leave XLA's buffer assignment, hence the memory numbers, unchanged.
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    # The CPU default schedules independent work side by side for its thread pool, which keeps more buffers
    # alive (+60% temporaries on the tiny step); accelerator schedulers order for memory, like this one.
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)
RESIDENT_NOTE = "nothing compiled: the resident set is counted exactly from the trainer's set-up; the step's peak needs a compile"
TPU_NOTE = "memory from the TPU compiler (libtpu, ahead of time): what this TPU slice would allocate"
PROXY_NOTE = ("memory from XLA's CPU buffer assignment: a proxy for TPU/GPU memory (backends differ in fusion, "
              "layout and bf16 handling); compare settings with it, leave headroom on the device")


def model_configs(config) -> tuple:
    """(component config dicts, where they came from): the tiny teacher, the teacher's folder, or SD 2.1-base."""
    from .models import presets

    if config.get("make_tiny_teacher"):
        from .files.diffusers_writer import write_clip_tokenizer

        # toy.tiny_teacher.make_tiny_pipeline's architecture without its weights (initialising them takes minutes on a
        # busy CPU); only the vocabulary size needs its tokenizer, which is built by rule in milliseconds.
        with tempfile.TemporaryDirectory() as tmp:
            vocab = write_clip_tokenizer(tmp, presets.TINY_CORPUS)
        configs = {"unet": presets.TINY_UNET, "text_encoder": dict(presets.TINY_TEXT, vocab_size=vocab),
                   "vae": presets.TINY_VAE, "scheduler": presets.DDPM_SCHEDULER}
        return configs, "tiny random teacher (swiftbrush_jax.toy.tiny_teacher)"
    if os.path.isdir(config.teacher):
        return presets.read_folder_configs(config.teacher), f"configs of {config.teacher}"
    if config.teacher in presets.BY_HUB_ID:
        return presets.BY_HUB_ID[config.teacher], f"{config.teacher} architecture (swiftbrush_jax.models.presets)"
    return presets.SD21_BASE, f"SD 2.1-base architecture (swiftbrush_jax.models.presets; {config.teacher} not on disk)"


def abstract_pipeline(configs: dict):
    """A StableDiffusion (SDXL when ``configs`` has a text_encoder_2) whose weights are ShapeDtypeStructs
    (float32, as loaded): the trainer's set-up functions run on it unchanged and place nothing."""
    from .models.text_encoder import CLIPTextConfig, CLIPTextModel, SDXLTextEncoders
    from .models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
    from .models.vae import AutoencoderKL, VAEConfig, vae_param_shapes
    from .files.pipeline import StableDiffusion
    from .schedule import NoiseSchedule

    unet_config = UNetConfig.from_diffusers(configs["unet"])
    vae_config = VAEConfig.from_diffusers(configs["vae"])
    text_config = CLIPTextConfig.from_transformers(configs["text_encoder"])
    sdxl = "text_encoder_2" in configs
    if sdxl:
        text_encoder = SDXLTextEncoders(text_config, CLIPTextConfig.from_transformers(configs["text_encoder_2"]))
        ids = jax.ShapeDtypeStruct((1, 2, text_config.max_position_embeddings), jnp.int32)
        init = text_encoder.clone(image_size=(8, 8)).init  # the time ids' size shapes no parameter
    else:
        text_encoder = CLIPTextModel(text_config)
        ids = jax.ShapeDtypeStruct((1, text_config.max_position_embeddings), jnp.int32)
        init = text_encoder.init
    return StableDiffusion(
        root="", unet=UNet2DConditionModel(unet_config), unet_params=unet_param_shapes(unet_config),
        text_encoder=text_encoder, text_params=jax.eval_shape(init, jax.random.PRNGKey(0), ids)["params"],
        vae=AutoencoderKL(vae_config), vae_params=vae_param_shapes(vae_config),
        schedule=NoiseSchedule.from_config(configs["scheduler"]), sdxl=sdxl, force_zeros_for_empty_prompt=sdxl)


@dataclasses.dataclass
class AbstractStep:
    """The trainer's jitted step and its abstract, sharded inputs, for any global batch."""

    step: Callable
    vsd: object
    state: object
    frozen: object
    batch_sharding: object
    token_shape: Callable  # prompts -> the shape of their token ids (files.pipeline.StableDiffusion.token_shape)

    def lower(self, global_batch: int):
        ids = jax.ShapeDtypeStruct(self.token_shape(global_batch), jnp.int32, sharding=self.batch_sharding)
        return self.step.lower(self.state, self.frozen, ids)

    def compile(self, global_batch: int):
        return self.lower(global_batch).compile()


def abstract_step(config, pipe, mesh) -> AbstractStep:
    """The trainer's state and frozen inputs as ShapeDtypeStructs laid out by the rule table (the trainer's
    own set-up functions on an abstract pipeline), and its step."""
    clip_parts = setup.clip_loss_parts(config, pipe)
    vsd = setup.build_vsd(config, pipe, clip_parts)
    state, state_sh = setup.initial_state(config, vsd, pipe.unet_params, mesh, abstract=True)
    frozen, frozen_sh = setup.frozen_inputs(config, pipe, mesh, clip_parts[2] if clip_parts else None)
    step = vsd.jit_train_step(state_sh, frozen_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    return AbstractStep(step, vsd, state, frozen, sharding.batch_sharding(mesh), pipe.token_shape)


def resident_bytes(config, pipe, step: AbstractStep) -> dict:
    """Per device, what the trainer keeps there between steps: its state, the frozen inputs, and (when it
    samples) the sampler's inputs, counted from the trainer's own set-up functions."""
    out = {"state_bytes": sharding.bytes_per_device(step.state), "frozen_bytes": sharding.bytes_per_device(step.frozen),
           "sampler_bytes": 0}
    if config.sample_every:
        out["sampler_bytes"] = sharding.bytes_per_device(setup.sampler_inputs(config, step.vsd, pipe,
                                                                              step.batch_sharding.mesh))
    out["resident_bytes"] = sum(out.values())
    return out


@dataclasses.dataclass
class Measurement:
    """What XLA reports for one compiled step; bytes are per device."""

    per_device_batch: int
    global_batch: int
    flops_per_device: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_s: float

    @property
    def total_bytes(self) -> int:
        """Live at once: inputs, scratch, and outputs that do not reuse a donated input buffer."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "total_gib": self.total_bytes / GIB}


def _flops(stage) -> float:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def model_flops(config, pipe, global_batch: int) -> float:
    """FLOPs of one step as the model defines them, for MFU: no rematerialisation, attention in one call.

    Read from the lowered (not compiled) program, so it costs a trace, not a compile. The compiled
    program's own count is not used for this: it includes recomputation, and XLA counts the body of a
    loop (attention in query blocks) once.
    """
    plain = config.copy_and_resolve_references()
    plain.remat, plain.attention_query_block, plain.microbatches = "none", 0, 1
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    return _flops(abstract_step(plain, pipe, mesh).lower(global_batch))


@dataclasses.dataclass
class DoesNotFit(Exception):
    """The TPU compiler refused the step: it needs more memory than the chip has (as the compiler reports both)."""

    per_device_batch: int
    needed_bytes: int
    capacity_bytes: int
    compile_s: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"per-device batch {self.per_device_batch} does not fit: the TPU compiler needs at least "
                f"{self.needed_bytes / GIB:.2f} GiB, the chip has {self.capacity_bytes / GIB:.2f} GiB")


# libtpu's refusals, by version: "Used 21.95G of 15.48G hbm." and "the total memory required for HLO
# temporaries (67.04G) exceeds available HBM (15.75G)". Either figure leaves out some of the step's bytes.
_HBM_OVERFLOW = (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
                 re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT]?)\)"))
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def hbm_overflow(message: str) -> Optional[tuple]:
    """(at least needed, capacity) bytes from a TPU compiler's out-of-memory message, or None for any other error."""
    for pattern in _HBM_OVERFLOW:
        found = pattern.search(message)
        if found:
            used, used_unit, cap, cap_unit = found.groups()
            return int(float(used) * _UNIT[used_unit]), int(float(cap) * _UNIT[cap_unit])
    return None


def measure(step: AbstractStep, per_device_batch: int, devices: int) -> Measurement:
    """Compile at this per-device batch and read XLA's figures; raises DoesNotFit where the TPU compiler refuses."""
    start = time.perf_counter()
    try:
        compiled = step.compile(per_device_batch * devices)
    except Exception as e:  # the compiler's error type differs by jax version; only HBM overflow is ours
        overflow = hbm_overflow(str(e))
        if overflow is None:
            raise
        raise DoesNotFit(per_device_batch, *overflow, time.perf_counter() - start) from None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return Measurement(per_device_batch, per_device_batch * devices, _flops(compiled), mem.argument_size_in_bytes,
                       mem.output_size_in_bytes, mem.alias_size_in_bytes, mem.temp_size_in_bytes,
                       mem.generated_code_size_in_bytes, seconds)


@dataclasses.dataclass
class BatchSearch:
    """The largest per-device batch within a budget, from a few compiles and a linear fit of bytes vs batch."""

    budget_bytes: float
    largest_measured_fit: Optional[int]
    fit_fixed_bytes: Optional[float]
    fit_bytes_per_sample: Optional[float]
    fit_estimate: Optional[int]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _linear_fit(points: Dict[int, int]) -> tuple:
    """(fixed, per-sample) bytes through the measured points, least squares."""
    b = np.array(sorted(points), np.float64)
    y = np.array([points[k] for k in sorted(points)], np.float64)
    slope, intercept = np.polyfit(b, y, 1)
    return float(intercept), float(slope)


def search_batch(total_at: Callable[[int], int], budget_bytes: float, start: int, max_compiles: int,
                 multiple: int = 1) -> BatchSearch:
    """Secant-style search: fit a line to the measured (batch, bytes) points, compile at its prediction, repeat.

    ``total_at(b)`` compiles at per-device batch ``b`` and returns its total bytes;
    the batch at ``start`` counts as already measured by the caller. Every batch tried is a multiple of
    ``multiple`` (the microbatch count).
    """
    points = {start: total_at(start)}
    second = start * 2 if points[start] <= budget_bytes else max(multiple, start // 2 // multiple * multiple)
    if second == start:
        second = start + multiple
    fixed = per_sample = estimate = None
    for _ in range(max_compiles):
        if second not in points:
            points[second] = total_at(second)
        fixed, per_sample = _linear_fit(points)
        if per_sample <= 0:
            break
        estimate = max(0, int((budget_bytes - fixed) // per_sample) // multiple * multiple)
        if estimate < 1 or estimate in points:
            break
        second = estimate
    fitting = [b for b, total in points.items() if total <= budget_bytes]
    return BatchSearch(budget_bytes, max(fitting) if fitting else None, fixed, per_sample, estimate)


def format_table(rows: List[Measurement]) -> str:
    header = ("batch/dev", "global", "TFLOP/dev", "args GiB", "out GiB", "aliased GiB", "temp GiB", "code MiB",
              "total GiB", "compile s")
    lines = [header]
    for m in rows:
        lines.append((str(m.per_device_batch), str(m.global_batch), f"{m.flops_per_device / 1e12:.3f}",
                      f"{m.argument_bytes / GIB:.2f}", f"{m.output_bytes / GIB:.2f}", f"{m.alias_bytes / GIB:.2f}",
                      f"{m.temp_bytes / GIB:.2f}", f"{m.code_bytes / 2**20:.1f}", f"{m.total_bytes / GIB:.2f}",
                      f"{m.compile_s:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def use_simulated_devices(n: int, plan_flags: bool = True) -> None:
    """``n`` CPU devices and (``plan_flags``) the plan's XLA flags; must run before JAX initialises its backend.
    A TPU compile goes without those flags: XLA_FLAGS reach libtpu's compiler too."""
    if plan_flags:
        given = os.environ.get("XLA_FLAGS", "")
        extra = [f for f in PLAN_XLA_FLAGS if f.split("=")[0] not in given]
        os.environ["XLA_FLAGS"] = " ".join([given] + extra).strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def tpu_devices(topology: str) -> list:
    """The chips of a TPU slice named like ``v5e:2x4``, as compile targets on any host (libtpu's AOT compiler)."""
    try:
        import libtpu  # noqa: F401  (only its presence is checked; JAX loads it as the TPU plugin)
    except ImportError:
        raise UsageError("--topology needs the TPU compiler, not a TPU: pip install libtpu") from None
    from jax.experimental import topologies

    # The TPU runtime locks a file against a second process; compiling ahead of time shares no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        dims = [int(d) for d in topology.split(":")[1].split("x")]
    except (IndexError, ValueError):
        raise UsageError(f"--topology {topology!r}: write a TPU slice as <version>:<chips per axis>, "
                         "e.g. v5e:2x4 or v5p:2x2x1") from None
    # A slice smaller than one host's default 2x2 chips is its own host.
    kwargs = {"chips_per_host_bounds": (dims + [1, 1])[:3]} if int(np.prod(dims)) < 4 else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except Exception as e:  # libtpu's message names what it cannot build
        raise UsageError(f"--topology {topology!r}: libtpu cannot build it ({str(e).splitlines()[0]})") from None


def main(argv):
    del argv
    config = setup.CONFIG.value
    if _TOPOLOGY.value:
        use_simulated_devices(1, plan_flags=False)  # tracing and the model-FLOPs count run on the host
        targets = tpu_devices(_TOPOLOGY.value)
        kind = f"{targets[0].device_kind} ({_TOPOLOGY.value}, compiled by libtpu)"
        devices, note = len(targets), TPU_NOTE
    else:
        use_simulated_devices(_DEVICES.value)
        devices, kind, note = _DEVICES.value, "simulated CPU", PROXY_NOTE
        targets = jax.devices()
        if len(targets) != devices:
            raise sharding.ShardingError(f"asked for {devices} simulated devices, JAX has {len(targets)}; "
                                         "run the plan in a fresh process")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, targets)
    per_device = _BATCH.value or max(1, config.batch_size // devices)
    if per_device % config.microbatches:
        raise UsageError(f"per-device batch {per_device} is not divisible by microbatches={config.microbatches}; "
                         f"use a multiple of {config.microbatches}")
    configs, source = model_configs(config)
    step = abstract_step(config, abstract_pipeline(configs), mesh)
    resident = resident_bytes(config, abstract_pipeline(configs), step)

    rows: List[Measurement] = []
    refused: List[DoesNotFit] = []

    def total_at(batch: int) -> int:
        """Bytes per device at this batch; a batch the TPU compiler refuses counts with what it said it needs."""
        for known in rows + refused:
            if known.per_device_batch == batch:
                return known.total_bytes if isinstance(known, Measurement) else known.needed_bytes
        try:
            rows.append(measure(step, batch, devices))
        except DoesNotFit as e:
            refused.append(e)
            print(f"{e} ({e.compile_s:.1f} s)", flush=True)
            return e.needed_bytes
        print(f"compiled per-device batch {batch}: {rows[-1].total_bytes / GIB:.2f} GiB, "
              f"{rows[-1].compile_s:.1f} s", flush=True)
        return rows[-1].total_bytes

    flops, search = None, None
    if not _RESIDENT_ONLY.value:
        total_at(per_device)
        flops = model_flops(config, abstract_pipeline(configs), per_device * devices)
        if _MEMORY.value is not None:
            search = search_batch(total_at, _MEMORY.value * GIB, per_device, _COMPILES.value, config.microbatches)

    print(f"model: {source}")
    if config.vsd.clip_weight:
        described = lambda key, default: config[key] if os.path.isdir(config[key]) else f"{default} (models.presets)"
        decoder = described("clip_decoder", "TAESD") if config.clip_decoder else "the teacher's VAE"
        print(f"CLIP loss: {described('clip_model', 'CLIP ViT-B/32')}, decoded by {decoder}")
    print(f"devices: {devices} {kind}, mesh data={mesh.shape[sharding.DATA]} x fsdp={mesh.shape[sharding.FSDP]}")
    print(f"dtypes: teacher {config.teacher_dtype}, student compute {config.student_compute_dtype} "
          f"(float32 master weights); remat {config.remat}; LoRA rank {config.lora.rank}; student "
          f"{f'LoRA rank {config.student_lora.rank}' if config.student_lora.rank else 'whole UNet'}; "
          f"microbatches {config.microbatches}")
    if rows:
        print(format_table(sorted(rows, key=lambda m: m.per_device_batch)))
    for e in sorted(refused, key=lambda e: e.per_device_batch):
        print(e)
    if rows or refused:
        print("total = arguments + temporaries + (outputs - aliased); FLOPs and bytes are per device")
    print(f"resident between steps, per device: {resident['resident_bytes'] / GIB:.3f} GiB (state "
          f"{resident['state_bytes'] / GIB:.3f}, frozen teacher, text encoder (and the CLIP loss's CLIP and decoder) "
          f"{resident['frozen_bytes'] / GIB:.3f}, "
          f"sampler inputs {resident['sampler_bytes'] / GIB:.3f}: the last is not among the step's arguments; "
          "peak = total + sampler inputs)")
    if flops is not None:
        print(f"model FLOPs per step (no recomputation; the basis of MFU): {flops / 1e12:.1f} TFLOP for the global "
              f"batch of {per_device * devices}, {flops / devices / 1e12:.1f} TFLOP per device")
    if search is not None:
        fits = "none measured fits" if search.largest_measured_fit is None else str(search.largest_measured_fit)
        print(f"budget {_MEMORY.value:g} GiB per device: largest measured per-device batch that fits: {fits}")
        if search.fit_bytes_per_sample is not None:
            print(f"  linear fit: {search.fit_fixed_bytes / GIB:.2f} GiB fixed + "
                  f"{search.fit_bytes_per_sample / GIB:.3f} GiB per sample -> estimate {search.fit_estimate}")
    print(f"note: {RESIDENT_NOTE if _RESIDENT_ONLY.value else note}")

    if _JSON.value:
        report = {
            "model": source, "devices": devices, "mesh": dict(mesh.shape), "teacher_dtype": config.teacher_dtype,
            "student_compute_dtype": config.student_compute_dtype, "remat": config.remat,
            "lora_rank": config.lora.rank, "student_lora_rank": config.student_lora.rank, "microbatches": config.microbatches, "backend": "tpu" if _TOPOLOGY.value else jax.default_backend(),
            "topology": _TOPOLOGY.value, "device_kind": kind, "jax": jax.__version__,
            "model_flops_per_step": flops, "model_flops_global_batch": per_device * devices, **resident,
            "measurements": [m.as_dict() for m in sorted(rows, key=lambda m: m.per_device_batch)],
            "does_not_fit": [e.as_dict() for e in sorted(refused, key=lambda e: e.per_device_batch)],
            "memory_gib": _MEMORY.value, "search": search.as_dict() if search else None, "note": note,
        }
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    from .errors import exit_on_user_error, parse_flags_or_exit

    flags.mark_flags_as_required(["config"])
    app.run(exit_on_user_error(main), flags_parser=parse_flags_or_exit)
