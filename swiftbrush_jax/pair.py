"""The difference of two nearly equal evaluations of one function, computed as a difference (a secant pass).

The VSD gradient needs e_lora - e_teacher: two outputs of one UNet whose weights differ only by the LoRA's
low-rank terms. Subtracting two bf16 outputs leaves mostly rounding (docs/bf16.md). This pass evaluates
f(x) and d = f(x + dx) - f(x) together, one primitive at a time over the function's jaxpr, so each
rounding is relative to d instead of to f(x):

* linear primitives (add, reshape, reductions by sum, ...) carry d through as they are;
* bilinear ones (mul, dot_general, conv) expand exactly: d(a b) = da (b + db) + a db; the two matmuls of
  a dot or convolution run in its own dtype (bf16) with float32 accumulation, rounding relative to d;
* anything else (exp, rsqrt, max, softmax's parts, ...) gives f(x + d) - f(x) evaluated in float32:
  elementwise or a reduction, cheap next to the matmuls.

No term is linearised, so d is the secant, not a tangent. A transform over the jaxpr keeps this apart
from the model code (one rule per kind of primitive, like ``jax.jvp`` but finite). The primal runs as the
original program does (bf16 stays bf16); d is carried in float32. A delta of None is an exact zero and
costs nothing.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core

from .models.conditioning import apply_unet, uncond_then_cond

F32 = jnp.float32
# Linear in the operands at these positions (None: all); the others (indices, predicates) must carry no delta.
LINEAR = {
    "add": None, "sub": None, "neg": None, "add_any": None, "concatenate": None, "copy": None, "copy_p": None,
    "reshape": (0,), "transpose": (0,), "broadcast_in_dim": (0,), "reduce_sum": (0,), "squeeze": (0,),
    "expand_dims": (0,), "rev": (0,), "slice": (0,), "convert_element_type": (0,), "real": (0,),
    "pad": (0, 1), "select_n": "cases", "dynamic_slice": (0,), "dynamic_update_slice": (0, 1), "gather": (0,),
    "cumsum": (0,),
}
BILINEAR = ("mul", "dot_general", "conv_general_dilated")
# Call-like primitives, whose body is evaluated in place (under the name of the param holding it); any
# other primitive with a body (scan, while, cond) is refused.
CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
         "checkpoint", "remat")
BODIES = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _bind(eqn, *args, **params):
    out = eqn.primitive.bind(*args, **{**eqn.params, **params})
    return list(out) if eqn.primitive.multiple_results else [out]


def _zeros(x):
    return jnp.zeros(jnp.shape(x), F32)


def _linear(eqn, xs, ds):
    positions = LINEAR[eqn.primitive.name]
    if positions == "cases":
        positions = tuple(range(1, len(xs)))
    elif positions is None:
        positions = tuple(range(len(xs)))
    fixed = [i for i in range(len(xs)) if i not in positions]
    if any(ds[i] is not None for i in fixed):
        raise NotImplementedError(f"pair pass: {eqn.primitive.name} with a perturbed non-linear operand")
    args = [(ds[i] if ds[i] is not None else _zeros(xs[i])) if i in positions else xs[i] for i in range(len(xs))]
    params = {}
    if eqn.primitive.name == "convert_element_type":
        params["new_dtype"] = F32  # d stays float32 whatever the primal is cast to
    return [d.astype(F32) for d in _bind(eqn, *args, **params)]


def _bilinear(eqn, xs, ds):
    (a, b), (da, db) = xs, ds
    if eqn.primitive.name == "mul":
        a32, b32 = jnp.asarray(a, F32), jnp.asarray(b, F32)
        shifted = b32 if db is None else b32 + db
        terms = ([da * shifted] if da is not None else []) + ([a32 * db] if db is not None else [])
        return [sum(terms)]
    params = {"preferred_element_type": F32}
    terms = []
    if da is not None:
        shifted = b if db is None else (b.astype(F32) + db).astype(b.dtype)
        terms.append(_bind(eqn, da.astype(a.dtype), shifted, **params)[0])
    if db is not None:
        terms.append(_bind(eqn, a, db.astype(b.dtype), **params)[0])
    return [sum(terms)]


def _secant(eqn, xs, ds, outs):
    """f(x + d) - f(x), both in float32."""
    if not all(is_float(o) for o in outs):
        raise NotImplementedError(f"pair pass: {eqn.primitive.name} of a perturbed input has a non-float output")
    base = [jnp.asarray(x, F32) if is_float(x) else x for x in xs]
    shifted = [b if d is None else b + d for b, d in zip(base, ds)]
    return [p - q for p, q in zip(_bind(eqn, *shifted), _bind(eqn, *base))]


def _body(eqn):
    if eqn.primitive.name not in CALLS:
        if any(name in eqn.params for name in BODIES + ("branches", "body_jaxpr")):
            raise NotImplementedError(f"pair pass: {eqn.primitive.name} of a perturbed input (loops and "
                                      f"branches are not supported; e.g. run without attention_query_block)")
        return None
    for name in BODIES:
        body = eqn.params.get(name)
        if body is not None:
            return (body.jaxpr, body.consts) if isinstance(body, core.ClosedJaxpr) else (body, ())
    return None


def eval_pair(jaxpr, consts, primals: Sequence, deltas: Sequence) -> tuple:
    """(outputs, their deltas) of a jaxpr at ``primals`` and ``primals + deltas``."""
    env = {}

    def read(v):
        return (v.val, None) if isinstance(v, core.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = (value, None)
    for var, value, delta in zip(jaxpr.invars, primals, deltas):
        env[var] = (value, delta)
    for eqn in jaxpr.eqns:
        xs, ds = zip(*[read(v) for v in eqn.invars]) if eqn.invars else ((), ())
        ds = [d if d is None or is_float(x) else None for x, d in zip(xs, ds)]
        if all(d is None for d in ds):
            outs, douts = _bind(eqn, *xs), None
        elif _body(eqn) is not None:
            body, body_consts = _body(eqn)
            outs, douts = eval_pair(body, body_consts, xs, ds)
        elif eqn.primitive.name in LINEAR:
            outs, douts = _bind(eqn, *xs), _linear(eqn, xs, ds)
        elif eqn.primitive.name in BILINEAR:
            outs, douts = _bind(eqn, *xs), _bilinear(eqn, xs, ds)
        else:
            outs = _bind(eqn, *xs)
            douts = _secant(eqn, xs, ds, outs)
        douts = douts if douts is not None else [None] * len(outs)
        for var, out, dout in zip(eqn.outvars, outs, douts):
            env[var] = (out, dout)
    outs, douts = zip(*[read(v) for v in jaxpr.outvars])
    return list(outs), list(douts)


def pair_apply(fun: Callable, primals: tuple, deltas: tuple) -> tuple:
    """(fun(*primals), fun(*(primals + deltas)) - fun(*primals)), the second computed as a difference.

    ``deltas`` has the structure of ``primals`` with None for any argument or leaf that does not change."""
    flat, tree = jax.tree_util.tree_flatten(primals)
    flat_deltas = _flat_deltas(primals, deltas)
    closed, out_shape = jax.make_jaxpr(lambda *leaves: fun(*jax.tree_util.tree_unflatten(tree, leaves)),
                                       return_shape=True)(*flat)
    outs, douts = eval_pair(closed.jaxpr, closed.consts, flat, flat_deltas)
    out_tree = jax.tree_util.tree_structure(out_shape)
    douts = [jnp.zeros(jnp.shape(o), F32) if d is None else d for o, d in zip(outs, douts)]
    return jax.tree_util.tree_unflatten(out_tree, outs), jax.tree_util.tree_unflatten(out_tree, douts)


def _flat_deltas(primals, deltas) -> list:
    """The deltas of ``primals``' leaves in flattening order, where a None stands for a whole subtree."""
    out = []

    def walk(p, d):
        if d is None:
            out.extend([None] * len(jax.tree_util.tree_leaves(p)))
        elif isinstance(p, (list, tuple)):
            for pi, di in zip(p, d):
                walk(pi, di)
        elif isinstance(p, dict):
            for key in sorted(p):
                walk(p[key], d.get(key))
        else:
            out.append(d)

    walk(primals, deltas)
    return out


def guided_difference(unet, params, lora, x, t, cond, uncond, scale: float, lora_scale_cfg: float):
    """(e_teacher, e_lora - e_teacher) of the guided teacher and LoRA teacher (``guided``'s formula, each at
    its own CFG scale), both from one pair pass of the adapted UNet in its own dtype. The teacher is the
    adapted UNet with every up-matrix at zero, so d flows from the up-matrices alone."""
    primal_lora = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if jax.tree_util.keystr(path).endswith("['up']") else v, lora)
    delta_lora = jax.tree_util.tree_map_with_path(
        lambda path, v: v if jax.tree_util.keystr(path).endswith("['up']") else None, lora)
    apply = lambda p, adapters, xs, ts, ctx: apply_unet(unet, {"params": p, "lora": adapters}, xs, ts, ctx)
    ctx = uncond_then_cond(uncond, cond)
    out, delta = pair_apply(apply, (params, primal_lora, jnp.concatenate([x, x]), jnp.concatenate([t, t]), ctx),
                            (None, delta_lora, None, None, None))
    out_uncond, out_cond = jnp.split(out.astype(F32), 2)
    d_uncond, d_cond = jnp.split(delta, 2)
    teacher = out_uncond + scale * (out_cond - out_uncond)
    return teacher, d_uncond + lora_scale_cfg * (d_cond - d_uncond) + (lora_scale_cfg - scale) * (out_cond - out_uncond)
