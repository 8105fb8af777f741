"""What a matmul precision setting costs on each accelerator, and a census of a lowered program's matmuls.

The VSD gradient's four score evaluations run with float32 activations (docs/bf16.md): their difference
e_teacher - e_lora is small next to each score, and bf16 rounding would drown it. How the float32 matmuls
and convolutions of those evaluations are computed is then set by ``score_precision``
(``jax.default_matmul_precision``), and one setting means different hardware on each backend: XLA maps
``tensorfloat32`` (``lax.Precision.HIGH``) to TF32 tensor cores on NVIDIA GPUs, to 3 bf16 passes on a TPU,
and a CPU computes float32 exactly whatever it is asked. ``highest`` is FP32 without tensor cores on a GPU
and 6 passes on a TPU.

The census reads a lowered program's StableHLO (``jax.jit(f).lower(...).as_text()`` or
``jax.export``'s ``mlir_module()``): each ``dot_general`` and ``convolution`` with its operand precision,
operand dtype and FLOPs. XLA's cost analysis counts FLOPs without their precision, so the time a precision
costs is counted here in bf16-pass equivalents (``PASSES``).
"""

import math
import re

# Cost of one float32 matmul FLOP at each precision, in bf16 tensor-core FLOPs: on a TPU the number of
# bf16 passes XLA makes; on an NVIDIA GPU the dense datasheet ratio (A100: 312 TFLOP/s bf16, 156 TF32,
# 19.5 FP32 on the SIMT units; H100 SXM: about 989, 495 and 67, the same ratios within 10%). A matmul
# whose operands are bf16 costs 1 whatever its precision.
PASSES = {
    "tpu": {"DEFAULT": 1, "HIGH": 3, "HIGHEST": 6},
    "gpu": {"DEFAULT": 2, "HIGH": 2, "HIGHEST": 16},
    "cpu": {"DEFAULT": 1, "HIGH": 1, "HIGHEST": 1},
}
# What a float32 matmul at each precision runs as (docs.jax.dev, "Matmul precision").
MEANING = {
    "tpu": {"DEFAULT": "1-pass bf16", "HIGH": "3-pass bf16", "HIGHEST": "6-pass bf16"},
    "gpu": {"DEFAULT": "TF32", "HIGH": "TF32", "HIGHEST": "FP32 without tensor cores"},
    "cpu": {"DEFAULT": "float32", "HIGH": "float32", "HIGHEST": "float32"},
}
_NAMES = {None: "DEFAULT", "default": "DEFAULT", "bfloat16": "DEFAULT", "fastest": "DEFAULT",
          "high": "HIGH", "tensorfloat32": "HIGH", "highest": "HIGHEST", "float32": "HIGHEST"}


def platform_kind(platform: str) -> str:
    """'gpu', 'tpu' or 'cpu' for a JAX backend or export platform name ('cuda', 'rocm', 'gpu', ...)."""
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def level(precision) -> str:
    """The lax.Precision level a ``jax.default_matmul_precision`` value sets ('DEFAULT', 'HIGH', 'HIGHEST'),
    or the value itself for a dot-algorithm preset (e.g. 'BF16_BF16_F32_X3')."""
    if precision in _NAMES or precision == "":
        return _NAMES[precision or None]
    return str(precision)


def score_matmuls(precision, platform: str) -> str:
    """What the score evaluations' float32 matmuls run as on ``platform``, e.g. 'TF32 on gpu'."""
    kind = platform_kind(platform)
    meaning = MEANING.get(kind, {}).get(level(precision), level(precision))
    return f"{meaning} on {kind}"


_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b")
_TENSOR = re.compile(r"tensor<([0-9x]*)x?([a-z0-9]+)>")
_PRECISION = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")
_LEVEL = re.compile(r"DEFAULT|HIGHEST|HIGH")
_CONTRACT = re.compile(r"contracting_dims = \[([0-9, ]*)\] x")
_KERNEL_LAYOUT = re.compile(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]")


def _shape(text: str) -> tuple:
    dims, dtype = text
    return tuple(int(d) for d in dims.split("x") if d), dtype


def census(module_text: str) -> dict:
    """{(op, operand dtype, precision level): {"count", "flops"}} of a StableHLO module's dots and convolutions.

    The dtype is the operands' ("f32", "bf16"), or both where they differ ("f32/bf16": XLA computes those in
    float32, so they cost as float32 ones). FLOPs are 2 x output elements x the products summed per output element (contracted dimensions of a dot;
    kernel elements over output features of a convolution). Loops are not unrolled: a ``while`` body counts
    once, so a step with microbatches or several LoRA updates is undercounted."""
    out = {}
    for line in module_text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        op = match.group(1)
        signature = line[line.rindex(" : ("):]
        tensors = [_shape(t) for t in _TENSOR.findall(signature)]
        (lhs, lhs_dtype), (rhs, rhs_dtype), (result, _) = tensors[0], tensors[1], tensors[-1]
        dtype = lhs_dtype if lhs_dtype == rhs_dtype else f"{lhs_dtype}/{rhs_dtype}"
        found = _PRECISION.search(line)
        levels = (sorted({_LEVEL.search(p).group(0) for p in found.group(1).split(",")}) if found
                  else ["DEFAULT"])
        precision = levels[-1] if len(levels) == 1 else "/".join(levels)
        if op == "dot_general":
            contracted = [int(d) for d in _CONTRACT.search(line).group(1).split(",") if d.strip()]
            per_output = math.prod(lhs[d] for d in contracted)
        else:
            layout = [d.strip() for d in _KERNEL_LAYOUT.search(line).group(1).split(",")]
            per_output = math.prod(rhs) // rhs[layout.index("o")]
        entry = out.setdefault((op, dtype, precision), {"count": 0, "flops": 0})
        entry["count"] += 1
        entry["flops"] += 2 * math.prod(result) * per_output
    return out


def precision_counts(counts: dict) -> dict:
    """{precision level: number of dots and convolutions} of a census."""
    totals = {}
    for (_, _, precision), entry in counts.items():
        totals[precision] = totals.get(precision, 0) + entry["count"]
    return totals


def pass_flops(counts: dict, platform: str) -> float:
    """A census's matmul FLOPs in bf16-pass equivalents on ``platform``: what its matmuls cost in time."""
    passes = PASSES[platform_kind(platform)]
    total = 0.0
    for (_, dtype, precision), entry in counts.items():
        total += entry["flops"] * (passes.get(precision, passes["HIGHEST"]) if "f32" in dtype else 1)
    return total
