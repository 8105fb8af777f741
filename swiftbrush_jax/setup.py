"""What the trainer and ``plan`` share: a config made into a mesh, a pipeline, the step and a train state.

``set_up`` is the trainer's whole start: mesh, prompts, teacher, state (fresh or
resumed), frozen inputs and the sampler's inputs, each placed on the mesh. ``plan``
calls the same functions on an abstract pipeline (``jax.ShapeDtypeStruct``
weights), so what it counts is what the trainer holds.
"""

import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from . import precision
from .data.prompts import PromptStats, load_prompts
from .data.stream import PromptStream
from .errors import UsageError
from .files import checkpoint as ckpt
from .files import storage
from .files.pipeline import load_pipeline
from .lora import init_lora, lora_scale
from .parallel import distributed, sharding
from .optim import make_optimizer
from .vsd import VSD, Frozen, VSDConfig


# ``--config configs/<file>.py[:arg]`` and its ``--config.key=value`` overrides, for train and plan alike.
CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)


def log(message: str) -> None:
    """Progress messages on the main process (absl's INFO stream is left to orbax's chatter)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def dtype_of(name: str):
    return jnp.dtype(name)


def prompt_source(config):
    """The prompt list: the shapes vocabulary for toy configs, else a prompt file or TFDS dataset."""
    if config.prompts == "shapes":
        from .toy.shapes import all_prompts

        prompts = list(all_prompts())
        return prompts, PromptStats(read=len(prompts), kept=len(prompts))
    return load_prompts(config.prompts, config.get("prompt_column", "text"))


def clip_loss_parts(config, pipe):
    """(CLIP module, decode(params, x0), {"model": CLIP weights, "decoder": decoder weights}) for the CLIP loss,
    host arrays; None without it. For an abstract pipeline (``plan``), the weights' ShapeDtypeStructs, from the
    folders' configs, or from ``models.presets``' CLIP ViT-B/32 and TAESD where the folders are not on disk."""
    if not config.vsd.clip_weight:
        return None
    if pipe.sdxl:
        raise UsageError(f"--config.vsd.clip_weight={config.vsd.clip_weight}: the CLIP loss is not supported for an "
                         "SDXL teacher yet (which tokenizer's ids its CLIP reads is not settled); set it to 0")
    from .models import presets
    from .models import read_config
    from .models.clip import clip_model_from_config, load_clip_model
    from .models.taesd import load_taesd, taesd_from_config

    if sharding.is_abstract(pipe.unet_params):
        on_disk = lambda key, default: read_config(config[key]) if os.path.isdir(config[key]) else default
        clip_model, clip_params = clip_model_from_config(on_disk("clip_model", presets.CLIP_VIT_B32))
        taesd, decoder_params = (taesd_from_config(on_disk("clip_decoder", presets.TAESD))
                                 if config.clip_decoder else (None, pipe.vae_params))
    else:
        for key in ("clip_model",) + (("clip_decoder",) if config.clip_decoder else ()):
            if not os.path.isdir(config[key]):
                raise UsageError(f"--config.{key}={config[key]!r}: not a local folder; the CLIP loss "
                                 f"(vsd.clip_weight > 0) needs a transformers CLIPModel folder"
                                 + (" and a diffusers AutoencoderTiny folder (or '' for the teacher's VAE)"
                                    if key == "clip_decoder" else ""))
        clip_model, clip_params = load_clip_model(config.clip_model)
        text, tokenizer = clip_model.text_config, pipe.tokenizer
        if (text.vocab_size != len(tokenizer) or text.eos_token_id != tokenizer.eos_token_id
                or text.max_position_embeddings < tokenizer.model_max_length):
            raise UsageError(f"--config.clip_model={config.clip_model}: its text tower does not read the teacher's "
                             f"token ids (vocabulary {text.vocab_size} vs {len(tokenizer)}, end-of-text id "
                             f"{text.eos_token_id} vs {tokenizer.eos_token_id}, {text.max_position_embeddings} "
                             f"positions for {tokenizer.model_max_length} tokens); use a CLIP with the teacher's "
                             f"tokenizer")
        taesd, decoder_params = load_taesd(config.clip_decoder) if config.clip_decoder else (None, pipe.vae_params)
    if taesd is not None:
        decode = lambda params, x0: taesd.apply({"params": params}, x0, method="decode")
    else:
        vae, scale = pipe.vae, pipe.vae.config.scaling_factor
        decode = lambda params, x0: vae.apply({"params": params}, x0 / scale, method=vae.decode)
    return clip_model, decode, {"model": clip_params, "decoder": decoder_params}


def build_vsd(config, pipe, clip_parts=None) -> VSD:
    """The step's static parts: student/teacher modules in their dtypes, schedule, both optimizers (and the
    CLIP loss's modules, from ``clip_loss_parts``)."""
    unet_config = pipe.unet.config
    memory = dict(remat=config.remat, attention_query_block=config.attention_query_block,
                  attention_implementation=config.attention_implementation or None)
    # The teacher is differentiated too (the LoRA loss), so it is rematerialised like the student.
    teacher_unet = pipe.unet.clone(dtype=dtype_of(config.teacher_dtype),
                                   lora_scale=lora_scale(config.lora.rank, config.lora.alpha), **memory)
    lora_student = config.student_lora.rank > 0
    student_lora_scale = lora_scale(config.student_lora.rank, config.student_lora.alpha) if lora_student else 1.0
    student_unet = pipe.unet.clone(dtype=dtype_of(config.student_compute_dtype), lora_scale=student_lora_scale,
                                   **memory)
    text_encoder = pipe.text_encoder.clone(dtype=dtype_of(config.teacher_dtype),
                                           **({"image_size": training_image_size(config, pipe)} if pipe.sdxl else {}))
    score_unet = teacher_unet.clone(dtype=dtype_of(config.score_dtype)) if config.score_dtype else None
    try:
        jax.default_matmul_precision(config.score_precision or None)
    except ValueError as e:
        raise UsageError(f"--config.score_precision={config.score_precision!r}: {e}") from None
    attention = config.attention_implementation
    if attention not in ("", "xla", "cudnn") or (attention == "cudnn" and jax.default_backend() != "gpu"):
        raise UsageError(f"--config.attention_implementation={attention!r}: use '' (XLA picks), 'xla', or 'cudnn' "
                         f"on an NVIDIA GPU (this backend: {jax.default_backend()})")
    if config.score_pair and config.attention_query_block:
        raise UsageError(f"--config.score_pair: the pair pass evaluates attention in one call; set "
                         f"--config.attention_query_block=0 (now {config.attention_query_block}) or score_pair=False")
    if lora_student and config.get("student_init"):
        raise UsageError("--config.student_init: a LoRA student (student_lora.rank > 0) is the teacher plus "
                         "adapters and cannot start from another UNet; leave student_init empty")
    if config.vsd.clip_weight and clip_parts is None:
        raise UsageError("--config.vsd.clip_weight: the CLIP loss needs --config.clip_model")
    if config.vsd.lora_updates_per_step < 1:
        raise UsageError(f"--config.vsd.lora_updates_per_step={config.vsd.lora_updates_per_step}: use 1 or more")
    latent = config.get("latent_size") or unet_config.sample_size
    return VSD(
        student_unet=student_unet, teacher_unet=teacher_unet, text_encoder=text_encoder,
        schedule=pipe.schedule, config=VSDConfig(**config.vsd),
        student_tx=make_optimizer(**config.student_optimizer), lora_tx=make_optimizer(**config.lora_optimizer),
        latent_shape=(latent, latent, unet_config.in_channels), microbatches=config.microbatches,
        score_unet=score_unet, score_precision=config.score_precision or None, score_pair=config.score_pair,
        lora_student=lora_student,
        clip_model=clip_parts[0] if clip_parts else None, clip_decode=clip_parts[1] if clip_parts else None)


def as_dtype(tree, dtype):
    """Host arrays cast in host memory, or ShapeDtypeStructs (planning) given the dtype."""
    cast = lambda x: (jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct)
                      else np.asarray(x).astype(dtype))
    return jax.tree_util.tree_map(cast, tree)


def training_image_size(config, pipe) -> Optional[tuple]:
    """(h, w) pixels of the training latents (SDXL's time ids say it); None for SD 1.x/2.x."""
    latent = config.get("latent_size") or pipe.unet.config.sample_size
    return pipe.image_size((latent, latent)) if pipe.sdxl else None


def text_embedding(config, pipe, prompts: Optional[Sequence[str]] = None):
    """The prompts' conditioning (for SDXL with the training size's time ids) in float32 on the host, or its
    ShapeDtypeStructs where the pipeline is abstract. Without prompts: the empty prompt's, one row, as the
    pipeline makes its negative (``encode_uncond``: zeros for SDXL with ``force_zeros_for_empty_prompt``)."""
    size = training_image_size(config, pipe)
    if sharding.is_abstract(pipe.text_params):
        encoder = pipe.text_encoder.clone(image_size=size) if size else pipe.text_encoder
        ids = jax.ShapeDtypeStruct(pipe.token_shape(1 if prompts is None else len(prompts)), jnp.int32)
        shapes = jax.eval_shape(lambda p, i: encoder.apply({"params": p}, i), pipe.text_params, ids)
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    cond = pipe.encode_uncond(size) if prompts is None else pipe.encode_text(list(prompts), size)
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), cond)


def frozen_inputs(config, pipe, mesh, clip_params=None):
    """Teacher UNet and text encoder weights in the teacher dtype, the empty-prompt embedding (and the CLIP
    loss's CLIP and decoder weights), on the mesh (cast in host memory, each device receiving its shard
    only), and their sharding."""
    teacher_dtype = dtype_of(config.teacher_dtype)
    frozen = Frozen(teacher=as_dtype(pipe.unet_params, teacher_dtype), text=as_dtype(pipe.text_params, teacher_dtype),
                    uncond=text_embedding(config, pipe),
                    clip=None if clip_params is None else as_dtype(clip_params, teacher_dtype))
    frozen_sh = sharding.tree_shardings(frozen, mesh)
    return sharding.place(frozen, frozen_sh), frozen_sh


def initial_state(config, vsd: VSD, student_params, mesh, abstract: bool = False):
    """A fresh train state (student copy, EMA, LoRA, optimizer states) created directly in its sharding from
    host (or abstract) student weights, and that sharding. ``abstract`` gives ShapeDtypeStructs instead, as a
    restore target or a plan."""
    rng, lora_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    make_lora = lambda: init_lora(lora_rng, student_params, config.lora.rank, tuple(config.lora.targets))
    if vsd.lora_student:  # the student's own adapters (up = 0: it starts as the teacher), from the shapes only
        unet_shapes = jax.eval_shape(lambda p: p, student_params)
        student_rng = jax.random.fold_in(lora_rng, 1)
        make_student, inputs = lambda: init_lora(student_rng, unet_shapes, config.student_lora.rank,
                                                 tuple(config.student_lora.targets)), ()
    else:
        make_student, inputs = lambda p: p, (student_params,)
    make_state = lambda *p: vsd.init_state(rng, make_student(*p), make_lora())
    shapes = jax.eval_shape(make_state, *inputs)
    state_sh = sharding.tree_shardings(shapes, mesh)
    if abstract or sharding.is_abstract(student_params):
        return ckpt.abstract(shapes, state_sh), state_sh
    in_sh = tuple(state_sh.student for _ in inputs)
    placed = tuple(sharding.place(p, sh) for p, sh in zip(inputs, in_sh))
    return jax.jit(make_state, in_shardings=in_sh, out_shardings=state_sh)(*placed), state_sh


def sampler_inputs(config, vsd: VSD, pipe, mesh) -> dict:
    """What the trainer's sampler keeps on the mesh: fixed noise and prompt embeddings (replicated) and the
    VAE's weights in the sampler's dtype, the student's compute dtype (split by the rule table like the
    teacher's). bfloat16 keeps float32's range, so the SD VAE decodes in it without overflow."""
    prompts = list(config.validation_prompts)
    replicated = sharding.replicated(mesh)
    shape = (len(prompts),) + tuple(vsd.latent_shape)
    z = (jax.ShapeDtypeStruct(shape, jnp.float32) if sharding.is_abstract(pipe.vae_params)
         else np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed + 1), shape)))
    inputs = {"z": z, "cond": text_embedding(config, pipe, prompts),
              "vae": as_dtype(pipe.vae_params, dtype_of(config.student_compute_dtype))}
    shardings = {"z": replicated, "cond": jax.tree_util.tree_map(lambda _: replicated, inputs["cond"]),
                 "vae": sharding.tree_shardings(inputs["vae"], mesh)}
    return sharding.place(inputs, shardings)


def resume_or_start(config, vsd: VSD, student_params, mesh, mngr, stream, workdir):
    """(state, its sharding, first step): the newest intact checkpoint, or a fresh state if there is none.

    The first step is the one the state holds (it also drives the EMA and the learning rates); the
    checkpoint's number and its prompt position must agree with it."""
    if not mngr.all_steps():
        state, state_sh = initial_state(config, vsd, student_params, mesh)
        return state, state_sh, 0
    target, state_sh = initial_state(config, vsd, student_params, mesh, abstract=True)
    state, meta, saved_at = ckpt.restore_newest_good(mngr, target, config,
                                                     storage.join(workdir, "corrupt_checkpoints"), log)
    start = int(sharding.host_local(state.step))
    try:
        next_batch = stream.check_resumable(meta["prompts"])
    except ValueError as e:
        raise ckpt.CheckpointError(f"checkpoint {saved_at} in {workdir} cannot continue this run: {e}") from None
    if not start == saved_at == next_batch:
        raise ckpt.CheckpointError(f"checkpoint {saved_at} in {workdir} is inconsistent: its state is at step {start} "
                                   f"and its prompt position at batch {next_batch}; restore the workdir from a backup")
    log(f"resumed from step {start}")
    return state, state_sh, start


@dataclasses.dataclass
class Run:
    """What the loop works with, set up: everything on a device is here (state, frozen inputs, the sampler's
    inputs), each device holding its shard of it and nothing else."""

    mesh: Any
    stream: PromptStream
    pipe: Any  # modules, tokenizer and schedule; its weights are on the mesh now, not here
    vsd: VSD
    mngr: Any
    state: Any
    state_sh: Any
    frozen: Frozen
    frozen_sh: Any
    sampler_inputs: Optional[dict]  # noise, prompt embeddings and VAE weights of the trainer's samples
    start: int
    teacher_source: str


def set_up(config, workdir: str) -> Run:
    """Mesh, prompts, teacher, train state (fresh or resumed), frozen inputs and sampler, placed on the mesh.

    Weights are read into host memory, cast there, and sent to the devices already sharded; the host
    copies are then dropped. Every input is checked before anything is compiled."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch(config.batch_size, mesh, config.microbatches)
    prompts, stats = prompt_source(config)
    log(f"prompts: {stats.describe()}")
    stream = PromptStream(prompts, config.batch_size, config.seed, jax.process_index(), jax.process_count())

    teacher_source = config.teacher
    if config.get("make_tiny_teacher"):
        from .toy.tiny_teacher import make_tiny_pipeline

        teacher_source = storage.join(workdir, "tiny_teacher")
        # One writer, the others wait for it; made locally, published whole (model_index.json last).
        if jax.process_index() == 0 and not storage.exists(storage.join(teacher_source, "model_index.json")):
            with storage.atomic_dir(teacher_source, written_last="model_index.json") as folder:
                make_tiny_pipeline(folder, seed=0)
        distributed.barrier("tiny_teacher")
    pipe = load_pipeline(teacher_source)
    student_params = pipe.unet_params
    if config.get("student_init"):
        student_params = load_pipeline(config.student_init, components=("unet",)).unet_params
    clip_parts = clip_loss_parts(config, pipe)
    vsd = build_vsd(config, pipe, clip_parts)
    log(f"score matmuls: {precision.score_matmuls(config.score_precision, jax.default_backend())} "
        f"(score_precision={config.score_precision!r}, score_dtype={config.score_dtype!r})")

    distributed.barrier("checkpoint_manager")  # its first collective must find every process within gloo's 30 s
    mngr = ckpt.manager(workdir, config.keep_checkpoints)
    state, state_sh, start = resume_or_start(config, vsd, student_params, mesh, mngr, stream, workdir)
    del student_params
    frozen, frozen_sh = frozen_inputs(config, pipe, mesh, clip_parts[2] if clip_parts else None)
    samples = sampler_inputs(config, vsd, pipe, mesh) if config.sample_every else None
    pipe.unet_params = pipe.text_params = pipe.vae_params = None
    return Run(mesh, stream, pipe, vsd, mngr, state, state_sh, frozen, frozen_sh, samples, start, teacher_source)
