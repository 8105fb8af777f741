"""How far the bf16 VSD step's gradients are from the float32 step's, and which precision change repairs them.

    python benchmarks/bf16_vsd_gradients.py                     # tiny SD 2.1-shaped pipeline, every candidate
    XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" \
        python benchmarks/bf16_vsd_gradients.py --size sd21     # full-size SD 2.1 UNet, random weights
    python benchmarks/bf16_vsd_gradients.py --json benchmarks/results/bf16_vsd_gradients.json
    python benchmarks/bf16_vsd_gradients.py --json benchmarks/results/bf16_vsd_gradients.json --table

Why: the VSD gradient is w(t) (e_teacher - e_lora) (SPEC §2, step 3). Early in a
run the LoRA teacher is the teacher plus a near-zero adapter, so the two guided
scores are nearly equal and their difference, times the CFG scale 4.5, is small
next to each of them. In bfloat16 (8 significant bits) that difference can be
mostly rounding. This program measures it: the same step (``VSD.losses_and_grads``)
and the same noise, once in float32 and once per precision setting, with the
LoRA up-matrices perturbed by ``p`` (normal * p) as after the first updates. It
reports cosine similarity and relative error ||a - b|| / ||b|| against float32
for the student gradient, the LoRA gradient, the x0-gradient w(t)(e_teacher -
e_lora) and the guided difference itself, the latter also at float32's own x0
(so that only the teacher side differs).

Settings change dtypes only, or emulate a one-module code change through Flax
method interception (``nn.intercept_methods``), so the step's code is the trainer's:

* ``bf16``: the default config: teacher weights, teacher, text encoder and student compute in bf16.
* ``teacher f32 compute``: teacher and LoRA teacher compute in float32 from bf16-stored weights.
* ``teacher f32``: ... from float32 weights. ``student f32``: only the student in float32.
* ``text f32``: only the text encoder in float32.
* ``lora branch f32``: the adapter's x down up, and its sum with the frozen projection, in float32.
* ``tail f32``: the UNet's last norm and conv (``conv_norm_out``, ``conv_out``) in float32;
  ``last block f32``: the last up block as well.
* ``one call``: e_teacher and e_lora from one batched UNet call (the adapter masked on the first half).

At ``--size sd21`` (forward half only, see ``sd21_problem``) the float32 reference and a
bf16 setting peaked at 9.5 GiB of host memory with the XLA_FLAGS above (LLVM's
optimisation off: the compile, not the 3.2 GiB of weights, dominates); a setting that
casts the bf16-stored weights to float32 inside the program went past 11 GiB.
* ``scores f32 compute``: only the four score evaluations of ``vsd_gradient`` (teacher and LoRA
  teacher, with and without the prompt) compute in float32, from the bf16-stored weights; the LoRA
  loss, the student and the text encoder stay bf16.
* ``scores f32 compute, <n> matmuls``: the same, with the float32 matmuls and convs as a TPU
  (1-pass bf16 by default; 3-pass bf16 = Precision.HIGH) or a recent NVIDIA GPU (TF32 by default)
  computes them, emulated on the CPU (``accelerator_matmuls``).
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import resource
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import hardware, write_json  # noqa: E402
from pipelines import training_config  # noqa: E402

from swiftbrush_jax import schedule as sched  # noqa: E402
from swiftbrush_jax import setup  # noqa: E402
from swiftbrush_jax.lora import init_lora, lora_scale  # noqa: E402
from swiftbrush_jax.models.layers import LoRADense  # noqa: E402
from swiftbrush_jax.vsd import VSD, Batch, Frozen, Trainable  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16
PERTURBATIONS = (0.005, 0.02, 0.1)
TARGET_COSINE = 0.99  # issue 14: the fixed bf16 step's student gradient against float32's, at p = 0.005


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where each part of the step computes, and which emulated one-module change is on."""

    teacher_params: str = "bfloat16"  # storage of the frozen teacher (and text encoder) weights
    teacher_compute: str = "bfloat16"  # the teacher / LoRA teacher UNet's compute dtype
    student_compute: str = "bfloat16"
    text_compute: str = "bfloat16"
    change: str = ""  # "", "scores_f32", "lora_branch_f32", "tail_f32", "last_block_f32", "one_call"
    matmul_passes: str = ""  # teacher's float32 matmuls/convs as an accelerator computes them: see ``MATMUL_PASSES``


REFERENCE = Setting("float32", "float32", "float32", "float32")
SETTINGS = {
    "bf16": Setting(),
    "teacher f32 compute": Setting(teacher_compute="float32"),
    "teacher f32": Setting(teacher_params="float32", teacher_compute="float32"),
    "student f32": Setting(student_compute="float32"),
    "text f32": Setting(text_compute="float32"),
    "lora branch f32": Setting(change="lora_branch_f32"),
    "tail f32": Setting(change="tail_f32"),
    "last block f32": Setting(change="last_block_f32"),
    "one call": Setting(change="one_call"),
    "scores f32 compute": Setting(change="scores_f32"),
    "scores f32 compute, 1-pass bf16 matmuls": Setting(change="scores_f32", matmul_passes="bf16"),
    "scores f32 compute, tf32 matmuls": Setting(change="scores_f32", matmul_passes="tf32"),
    "scores f32 compute, 3-pass bf16 matmuls": Setting(change="scores_f32", matmul_passes="bf16_3x"),
}
SD21_SETTINGS = ("bf16", "scores f32 compute", "scores f32 compute, 1-pass bf16 matmuls",
                 "scores f32 compute, tf32 matmuls", "scores f32 compute, 3-pass bf16 matmuls")


# Significand bits an accelerator keeps of float32 matmul/conv inputs at its default precision
# (docs.jax.dev "Matmul precision": bfloat16 on TPU, TF32 on recent NVIDIA GPUs); products are
# accumulated in float32. "bf16_3x" is TPU's Precision.HIGH: x = hi + lo in bfloat16, three passes.
MATMUL_PASSES = {"bf16": 7, "tf32": 10, "bf16_3x": 7}
# Public and internal names through which Flax's Dense/Conv, jnp.dot and the attention's einsums reach
# XLA's dot and conv (einsum binds its dot at definition, so it is given the emulated one explicitly).
_BILINEAR_NAMES = (("jax.lax", "dot_general"), ("jax._src.lax.lax", "dot_general"),
                   ("jax.lax", "conv_general_dilated"), ("jax._src.lax.convolution", "conv_general_dilated"))
_EINSUM_NAMES = (("jax.numpy", "einsum"), ("jax._src.numpy.einsum", "einsum"))


def _rounded(x, mantissa_bits):
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=mantissa_bits)


def _emulated(original, passes: str):
    """``original`` (a bilinear op: dot or conv) with float32 operands rounded as ``passes`` says."""
    bits = MATMUL_PASSES[passes]

    def op(lhs, rhs, *args, **kwargs):
        if jnp.result_type(lhs) != F32 or jnp.result_type(rhs) != F32:
            return original(lhs, rhs, *args, **kwargs)
        lhs_hi, rhs_hi = _rounded(lhs, bits), _rounded(rhs, bits)
        out = original(lhs_hi, rhs_hi, *args, **kwargs)
        if passes == "bf16_3x":
            lhs_lo, rhs_lo = _rounded(lhs - lhs_hi, bits), _rounded(rhs - rhs_hi, bits)
            out = out + original(lhs_hi, rhs_lo, *args, **kwargs) + original(lhs_lo, rhs_hi, *args, **kwargs)
        return out

    return op


@contextlib.contextmanager
def accelerator_matmuls(passes: str):
    """While tracing: every float32 dot and conv computed as an accelerator's default (or HIGH) precision would.

    A CPU computes float32 matmuls exactly and refuses the BF16/TF32 dot algorithms, so
    the rounding is emulated: operands rounded with ``lax.reduce_precision``, products
    summed in float32. jnp.dot and einsum cache their traces: ``measure`` clears JAX's
    caches before and after a setting that emulates, so no cached trace bypasses (or keeps) it.
    """
    if not passes:
        yield
        return
    saved = [(importlib.import_module(module), attr) for module, attr in _BILINEAR_NAMES + _EINSUM_NAMES]
    saved = [(module, attr, getattr(module, attr)) for module, attr in saved]
    try:
        emulated_dot = _emulated(jax.lax.dot_general, passes)
        for module, attr, original in saved:
            if attr == "einsum":
                setattr(module, attr, functools.partial(original, _dot_general=emulated_dot))
            else:
                setattr(module, attr, _emulated(original, passes))
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def lora_dense(module: LoRADense, x, lora_dtype, lora_rows=None):
    """``LoRADense.__call__`` with the adapter branch in ``lora_dtype`` and optionally only on some rows.

    Same operations as the layer: frozen projection in the module's dtype, then
    ``+ scale * (x down) up``; with ``lora_dtype`` float32 the sum is float32 and
    rounded once to the module's dtype at the end.
    """
    dtype = module.dtype
    y = jnp.dot(x.astype(dtype), module.get_variable("params", "kernel").astype(dtype))
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(dtype)
    down = module.get_variable("lora", "down").astype(lora_dtype)
    up = module.get_variable("lora", "up").astype(lora_dtype)
    delta = module.lora_scale * jnp.dot(jnp.dot(x.astype(lora_dtype), down), up)
    if lora_rows is not None:
        delta = jnp.where(lora_rows.reshape((-1,) + (1,) * (delta.ndim - 1)), delta, jnp.zeros_like(delta))
    return (y.astype(lora_dtype) + delta).astype(dtype)


def is_adapted_call(context) -> bool:
    return (isinstance(context.module, LoRADense) and context.method_name == "__call__"
            and context.module.has_variable("lora", "down"))


def lora_branch_f32(next_fun, args, kwargs, context):
    """Interceptor: adapted projections add their low-rank update in float32."""
    if not is_adapted_call(context):
        return next_fun(*args, **kwargs)
    return lora_dense(context.module, args[0], F32)


def float32_modules(names):
    """Interceptor: the top-level UNet submodules ``names`` recomputed in float32 from their bf16 inputs."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.path not in names:
            return next_fun(*args, **kwargs)
        if hasattr(module, "opts"):  # an up block: its dtype lives in its BlockOptions
            clone = module.clone(parent=None, opts=dataclasses.replace(module.opts, dtype=F32))
        else:
            clone = module.clone(parent=None, dtype=F32)
        upcast = jax.tree_util.tree_map(lambda a: a.astype(F32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                        (args, kwargs))
        return clone.apply(module.variables, *upcast[0], **upcast[1])

    return intercept


@dataclasses.dataclass(frozen=True)
class ChangedVSD(VSD):
    """The trainer's VSD with one emulated change to how the teacher and LoRA teacher compute."""

    change: str = ""
    matmul_passes: str = ""

    def _interceptor(self):
        if self.change == "lora_branch_f32":
            return lora_branch_f32
        if self.change == "tail_f32":
            return float32_modules({("conv_norm_out",), ("conv_out",)})
        if self.change == "last_block_f32":
            last = len(self.teacher_unet.config.up_block_types) - 1
            return float32_modules({(f"up_blocks.{last}",), ("conv_norm_out",), ("conv_out",)})
        return None

    def vsd_gradient(self, teacher_params, lora_params, x0, cond, uncond, noise):
        with accelerator_matmuls(self.matmul_passes):
            return self._vsd_gradient(teacher_params, lora_params, x0, cond, uncond, noise)

    def lora_loss(self, lora_params, teacher_params, x0, cond, uncond, noise):
        with accelerator_matmuls(self.matmul_passes):
            return self._lora_loss(lora_params, teacher_params, x0, cond, uncond, noise)

    def _vsd_gradient(self, teacher_params, lora_params, x0, cond, uncond, noise):
        if self.change == "scores_f32":  # only the four score evaluations; the LoRA loss keeps the bf16 teacher
            scores_f32 = dataclasses.replace(self, teacher_unet=self.teacher_unet.clone(dtype=F32), change="")
            return scores_f32._vsd_gradient(teacher_params, lora_params, x0, cond, uncond, noise)
        if self.change == "one_call":
            return self._one_call_gradient(teacher_params, lora_params, x0, cond, uncond, noise)
        interceptor = self._interceptor()
        if interceptor is None:
            return super().vsd_gradient(teacher_params, lora_params, x0, cond, uncond, noise)
        with nn.intercept_methods(interceptor):
            return super().vsd_gradient(teacher_params, lora_params, x0, cond, uncond, noise)

    def _lora_loss(self, lora_params, teacher_params, x0, cond, uncond, noise):
        interceptor = None if self.change == "one_call" else self._interceptor()
        if interceptor is None:
            return super().lora_loss(lora_params, teacher_params, x0, cond, uncond, noise)
        with nn.intercept_methods(interceptor):
            return super().lora_loss(lora_params, teacher_params, x0, cond, uncond, noise)

    def _one_call_gradient(self, teacher_params, lora_params, x0, cond, uncond, noise):
        """e_teacher and e_lora from one UNet call on [uncond, cond | uncond, cond], the adapter on the second half."""
        c, t = self.config, noise.t_vsd
        b = x0.shape[0]
        x_t = sched.add_noise(self.schedule, x0, noise.eps_vsd, t)
        empty = jnp.broadcast_to(uncond, (b,) + uncond.shape[1:])
        lora_rows = jnp.arange(4 * b) >= 2 * b

        def second_half_adapted(next_fun, args, kwargs, context):
            if not is_adapted_call(context):
                return next_fun(*args, **kwargs)
            return lora_dense(context.module, args[0], context.module.dtype, lora_rows)

        with nn.intercept_methods(second_half_adapted):
            out = self.teacher_unet.apply({"params": teacher_params, "lora": lora_params}, jnp.concatenate([x_t] * 4),
                                          jnp.concatenate([t] * 4), jnp.concatenate([empty, cond, empty, cond]))
        u_t, c_t, u_l, c_l = jnp.split(out.astype(F32), 4)
        e_teacher = sched.to_epsilon(self.schedule, u_t + c.guidance_scale * (c_t - u_t), x_t, t)
        e_lora = sched.to_epsilon(self.schedule, u_l + c.lora_guidance_scale * (c_l - u_l), x_t, t)
        _, sigma = sched.alpha_sigma(self.schedule, t)
        return jnp.nan_to_num(sigma**2 * (e_teacher - e_lora), nan=0.0, posinf=0.0, neginf=0.0)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(F32) for x in jax.tree_util.tree_leaves(tree)])


def compare(a, b) -> dict:
    """Cosine of a with the reference b, relative error ||a - b|| / ||b||, norm ratio ||a|| / ||b||."""
    a, b = np.asarray(flat(a), np.float64), np.asarray(flat(b), np.float64)
    nb = np.linalg.norm(b)
    return {"cosine": float(a @ b / (np.linalg.norm(a) * nb)), "rel_error": float(np.linalg.norm(a - b) / nb),
            "norm_ratio": float(np.linalg.norm(a) / nb)}


def perturbed_lora(lora, p: float, seed: int):
    """The LoRA tree with every up-matrix set to normal * p: a LoRA teacher a little off the teacher."""
    leaves = traverse_util.flatten_dict(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return traverse_util.unflatten_dict({
        path: (jax.random.normal(key, value.shape, F32) * p if path[-1] == "up" else value)
        for (path, value), key in zip(sorted(leaves.items()), keys)})


@dataclasses.dataclass
class Problem:
    """Everything both steps share: modules in float32, weights in float32, prompts, noise, adapters."""

    vsd: VSD  # float32 modules; settings clone them
    unet: nn.Module
    text_encoder: nn.Module
    unet_params: dict
    text_params: dict
    token_ids: jax.Array
    cond_f32: jax.Array  # used when there is no text encoder (sd21 size)
    uncond: jax.Array
    noise: object
    lora: dict
    gradients: bool  # False: the forward half only (x0, x0-gradient, guided difference)


def build_vsd(problem: Problem, setting: Setting) -> "ChangedVSD":
    """The float32 step's VSD with the setting's compute dtypes and change.

    The trainer's own score module and precision (``score_unet``, ``score_precision``: the fix this
    benchmark led to) are left unset, so the scores compute where the setting says.
    """
    base = problem.vsd
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(VSD)}
    fields.update(score_unet=None, score_precision=None)
    text_encoder = base.text_encoder.clone(dtype=jnp.dtype(setting.text_compute)) if base.text_encoder else None
    return ChangedVSD(**{**fields, "student_unet": base.student_unet.clone(dtype=jnp.dtype(setting.student_compute)),
                         "teacher_unet": base.teacher_unet.clone(dtype=jnp.dtype(setting.teacher_compute)),
                         "text_encoder": text_encoder}, change=setting.change,
                      matmul_passes=setting.matmul_passes)


def step_outputs(problem: Problem, setting: Setting):
    """A jitted function of (LoRA tree, float32 x0 or None): the step's gradients, x0-gradient, guided difference.

    With ``problem.gradients`` false only the forward half is compiled: x0, the
    x0-gradient w(t)(e_teacher - e_lora) and loss_student = 0.5 mean(x0-gradient^2).
    """
    vsd = build_vsd(problem, setting)
    store = jnp.dtype(setting.teacher_params)
    cast = lambda tree: jax.tree_util.tree_map(lambda x: x if x.dtype == store else x.astype(store), tree)
    teacher = cast(problem.unet_params)
    text = cast(problem.text_params) if problem.text_params else None
    student = problem.unet_params  # master weights stay float32 (the trainer's student copy)
    if not problem.gradients:
        return forward_outputs(problem, vsd, student, teacher)

    def run(student, teacher, text, lora, x0_ref):
        cond = problem.cond_f32 if text is None else vsd.text_encoder.apply({"params": text}, problem.token_ids)
        cond = cond.astype(F32)
        x0 = vsd.student_x0(student, teacher, problem.noise.z, cond)
        _, sigma = sched.alpha_sigma(vsd.schedule, problem.noise.t_vsd)
        x0_grad = vsd.vsd_gradient(teacher, lora, x0, cond, problem.uncond, problem.noise)
        out = {"loss_student": 0.5 * jnp.mean(x0_grad**2), "x0_grad": x0_grad,
               "guided_difference": x0_grad / sigma**2, "x0": x0}
        if problem.gradients:
            means, grads = vsd.losses_and_grads(Trainable(student=student, lora=lora),
                                                Frozen(teacher=teacher, text=None, uncond=problem.uncond),
                                                Batch(cond=cond, noise=problem.noise))
            out["student_grads"], out["lora_grads"] = grads.student, grads.lora
            out["loss_student"] = means["loss_student"]
        if x0_ref is not None:
            out["guided_difference_at_f32_x0"] = (
                vsd.vsd_gradient(teacher, lora, x0_ref, cond, problem.uncond, problem.noise) / sigma**2)
        return out

    compiled = jax.jit(run)
    return lambda lora, x0_ref=None: compiled(student, teacher, text, lora, x0_ref)


def forward_outputs(problem: Problem, vsd: VSD, student, teacher):
    """``step_outputs`` without gradients or text encoder, as two programs: the student's x0 and the x0-gradient.

    At full size one program holding every UNet call needs more compile memory than the
    development machine spares; split, the x0-gradient program also serves the float32 x0.
    """
    cond = problem.cond_f32.astype(F32)
    student_x0 = jax.jit(lambda params: vsd.student_x0(params, teacher, problem.noise.z, cond))
    x0_gradient = jax.jit(lambda params, lora, x0: vsd.vsd_gradient(params, lora, x0, cond, problem.uncond,
                                                                     problem.noise))
    _, sigma = sched.alpha_sigma(vsd.schedule, problem.noise.t_vsd)

    def run(lora, x0_ref=None):
        x0 = student_x0(student)
        x0_grad = x0_gradient(teacher, lora, x0)
        out = {"loss_student": 0.5 * jnp.mean(x0_grad**2), "x0_grad": x0_grad,
               "guided_difference": x0_grad / sigma**2, "x0": x0}
        if x0_ref is not None:
            out["guided_difference_at_f32_x0"] = x0_gradient(teacher, lora, x0_ref) / sigma**2
        return out

    return run


# What is compared against float32, by output name; gradients only when the problem computes them.
COMPARED = {"student_grad": "student_grads", "lora_grad": "lora_grads", "x0_grad": "x0_grad",
            "guided_difference": "guided_difference", "x0": "x0"}


def measure(problem: Problem, names, perturbations, log, on_setting) -> dict:
    """Every setting's errors against float32 at every p; ``on_setting(results)`` after each setting."""
    reference = step_outputs(problem, REFERENCE)
    results = {}
    refs = {p: jax.device_get(reference(perturbed_lora(problem.lora, p, seed=1))) for p in perturbations}
    for name in names:
        setting = SETTINGS[name]
        start = time.perf_counter()
        if setting.matmul_passes:
            jax.clear_caches()
        run = step_outputs(problem, setting)
        rows = {}
        for p in perturbations:
            ref = refs[p]
            got = jax.device_get(run(perturbed_lora(problem.lora, p, seed=1), jnp.asarray(ref["x0"])))
            row = {key: compare(got[out], ref[out]) for key, out in COMPARED.items() if out in ref}
            # Same float32 x0 for both: only the teacher side of the step differs.
            row["guided_difference_at_f32_x0"] = compare(got["guided_difference_at_f32_x0"], ref["guided_difference"])
            row["loss_student_ratio"] = float(got["loss_student"] / ref["loss_student"])
            rows[str(p)] = row
            gradients = (f"student cos {row['student_grad']['cosine']:.4f} rel {row['student_grad']['rel_error']:.3f}"
                         f" | lora cos {row['lora_grad']['cosine']:.5f} | " if "student_grad" in row else "")
            log(f"{name:42s} p={p:<6} {gradients}x0-grad cos {row['x0_grad']['cosine']:.4f} | "
                f"diff cos {row['guided_difference']['cosine']:.4f} "
                f"(at f32 x0 {row['guided_difference_at_f32_x0']['cosine']:.4f}) | loss x{row['loss_student_ratio']:.2f}"
                f" | peak RSS {peak_rss_gib():.1f} GiB")
        if setting.matmul_passes:
            jax.clear_caches()
        results[name] = {"setting": dataclasses.asdict(setting), "by_p": rows,
                         "seconds": round(time.perf_counter() - start, 1)}
        on_setting(results)
    return results


def markdown_table(results: dict) -> str:
    """One row per (size, setting, p): cosines and relative errors against float32, as docs/bf16.md shows them."""
    def cell(row, key, field):
        return f"{row[key][field]:.4f}" if key in row else "-"

    lines = ["| size | setting | p | student cos | student rel err | LoRA cos | LoRA rel err | diff cos | "
             "diff rel err | diff cos, f32 x0 | loss_student / f32 |", "|" + "---|" * 11]
    for size, payload in results.items():
        for name, measured in payload["settings"].items():
            for p, row in measured["by_p"].items():
                lines.append(
                    f"| {size} | {name} | {p} | {cell(row, 'student_grad', 'cosine')} | "
                    f"{cell(row, 'student_grad', 'rel_error')} | {cell(row, 'lora_grad', 'cosine')} | "
                    f"{cell(row, 'lora_grad', 'rel_error')} | {cell(row, 'guided_difference', 'cosine')} | "
                    f"{cell(row, 'guided_difference', 'rel_error')} | "
                    f"{cell(row, 'guided_difference_at_f32_x0', 'cosine')} | {row['loss_student_ratio']:.2f} |")
    return "\n".join(lines)


def tiny_problem(root: str, batch: int, seed: int) -> Problem:
    """The tiny SD 2.1-shaped pipeline of configs/tiny.py (random weights), the trainer's own modules."""
    from swiftbrush_jax.files.pipeline import load_pipeline
    from swiftbrush_jax.models.presets import TINY_CORPUS as CORPUS
    from swiftbrush_jax.toy.tiny_teacher import make_tiny_pipeline

    config = training_config("tiny")
    pipe = load_pipeline(make_tiny_pipeline(os.path.join(root, "tiny")))
    vsd = setup.build_vsd(config, pipe)  # tiny.py computes in float32: the reference's modules
    lora = init_lora(jax.random.PRNGKey(seed), pipe.unet_params, config.lora.rank, tuple(config.lora.targets))
    ids = jnp.asarray(pipe.tokenize([CORPUS[i % len(CORPUS)] for i in range(batch)]))
    return Problem(vsd=vsd, unet=pipe.unet, text_encoder=pipe.text_encoder, unet_params=pipe.unet_params,
                   text_params=pipe.text_params, token_ids=ids, cond_f32=None,
                   uncond=pipe.encode_text([""]).astype(F32), noise=vsd.draw(jax.random.PRNGKey(seed + 1), batch),
                   lora=lora, gradients=True)


def random_params(shapes, seed: int):
    """Random weights for a parameter tree of ShapeDtypeStructs, one leaf at a time in host memory.

    Kernels are normal with std 1/sqrt(fan in) (Flax's lecun_normal without truncation), biases
    zero, norm scales one. Made leaf by leaf, the peak is the tree plus one leaf; Flax's jitted
    ``init`` of the full-size UNet held about twice the tree.
    """
    rng = np.random.default_rng(seed)

    def make(path, shape):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(shape.shape[:-1]))
            return jnp.asarray(rng.standard_normal(shape.shape, dtype=np.float32) / np.sqrt(fan_in))
        return jnp.ones(shape.shape, F32) if name == "scale" else jnp.zeros(shape.shape, F32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def sd21_problem(latent: int, batch: int, seed: int, gradients: bool) -> Problem:
    """A full-size SD 2.1-base UNet with Flax's random init, random text states (77 x 1024), rank-64 LoRA.

    No text encoder: the UNet casts its text states to its compute dtype, so the
    text encoder's precision is measured at the tiny size. Without ``gradients`` only
    the forward half is compiled: on a 2-core CPU, compiling the full step for each
    setting takes too long, and the x0-gradient is what the student's gradient is pulled back from.
    """
    from swiftbrush_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
    from swiftbrush_jax.schedule import NoiseSchedule
    from swiftbrush_jax.models.presets import SCHEDULER, UNET
    from swiftbrush_jax.optim import make_optimizer
    from swiftbrush_jax.vsd import VSDConfig

    config = training_config("sd21")
    unet_config = UNetConfig.from_diffusers(UNET)
    unet = UNet2DConditionModel(unet_config)
    k_lora, k_text, k_noise = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = random_params(unet_param_shapes(unet_config), seed)
    teacher_unet = unet.clone(lora_scale=lora_scale(config.lora.rank, config.lora.alpha))
    vsd = VSD(student_unet=unet, teacher_unet=teacher_unet, text_encoder=None,
              schedule=NoiseSchedule.from_config(SCHEDULER), config=VSDConfig(**config.vsd),
              student_tx=make_optimizer(**config.student_optimizer), lora_tx=make_optimizer(**config.lora_optimizer),
              latent_shape=(latent, latent, 4))
    lora = init_lora(k_lora, params, config.lora.rank, tuple(config.lora.targets))
    k_cond, k_uncond = jax.random.split(k_text)
    return Problem(vsd=vsd, unet=unet, text_encoder=None, unet_params=params, text_params=None, token_ids=None,
                   cond_f32=jax.random.normal(k_cond, (batch, 77, 1024)),
                   uncond=jax.random.normal(k_uncond, (1, 77, 1024)), noise=vsd.draw(k_noise, batch), lora=lora,
                   gradients=gradients)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    parser.add_argument("--settings", nargs="*", help=f"default: all at tiny size, {list(SD21_SETTINGS)} at sd21")
    parser.add_argument("--p", nargs="*", type=float, default=list(PERTURBATIONS))
    parser.add_argument("--batch", type=int, default=0, help="default: 4 (tiny config's batch), 1 at sd21")
    parser.add_argument("--latent", type=int, default=8, help="sd21 latent side (8: 64 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradients", action="store_true",
                        help="sd21: also the student and LoRA gradients (compiles the whole step; needs ~12 GB)")
    parser.add_argument("--json", help="write this size's results into this JSON file (other sizes, and other "
                                       "settings of the same problem, are kept)")
    parser.add_argument("--table", action="store_true", help="print the --json file's results as a Markdown table")
    args = parser.parse_args()
    if args.table:
        with open(args.json) as f:
            print(markdown_table(json.load(f)))
        return
    names = args.settings or (list(SETTINGS) if args.size == "tiny" else list(SD21_SETTINGS))
    log = lambda message: print(message, flush=True)
    start = time.perf_counter()
    batch = args.batch or (4 if args.size == "tiny" else 1)

    def save(results):
        """Write what is measured so far: a long run that is stopped keeps its finished settings."""
        if not args.json:
            return
        payload = {"size": args.size, "batch": batch, "latent": args.latent if args.size == "sd21" else 8,
                   "seed": args.seed, "gradients": args.size == "tiny" or args.gradients, "guidance_scale": 4.5,
                   "target_student_cosine_at_p_0.005": TARGET_COSINE,
                   "seconds": round(time.perf_counter() - start, 1), "hardware": hardware()}
        merged = {}
        if os.path.exists(args.json):
            with open(args.json) as f:
                merged = json.load(f)
        previous = merged.get(args.size, {})
        same_problem = all(previous.get(k) == payload[k] for k in ("batch", "latent", "seed", "gradients"))
        # Settings an earlier run measured on the same problem are kept.
        payload["settings"] = {**(previous.get("settings", {}) if same_problem else {}), **results}
        merged[args.size] = payload
        write_json(args.json, merged)

    if args.size == "tiny":
        with tempfile.TemporaryDirectory() as root:
            measure(tiny_problem(root, batch, args.seed), names, args.p, log, save)
    else:
        problem = sd21_problem(args.latent, batch, args.seed, args.gradients)
        log(f"SD 2.1 UNet built, peak RSS {peak_rss_gib():.1f} GiB")
        measure(problem, names, args.p, log, save)


if __name__ == "__main__":
    main()
