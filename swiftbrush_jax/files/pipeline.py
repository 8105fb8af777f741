"""Loading a Stable Diffusion or SDXL pipeline (diffusers layout) from a folder, a bucket or a Hub id.

Only what the project needs is fetched from the Hub: each component's
``config.json``, its full-precision safetensors and the tokenizer files.
"""

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import storage

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/scheduler_config.json",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model.safetensors.index.json",
    "*/diffusion_pytorch_model-*.safetensors",
    "*/model.safetensors",
    "*/model.safetensors.index.json",
    "*/model-*.safetensors",
    "tokenizer/*",
    "tokenizer_2/*",
]
# What an SDXL folder holds beside each of COMPONENTS (docs/sdxl.md): a second tokenizer and text encoder.
SDXL_SECOND = {"tokenizer": "tokenizer_2", "text_encoder": "text_encoder_2"}


class PipelineError(ValueError):
    """A model source that is not a usable diffusers pipeline; the message says what to fix."""


def resolve(source: str) -> str:
    """A local folder as is; a folder URL (``gs://...``) copied once to a local cache (``storage.local_copy``);
    otherwise a Hub repo id downloaded (or found in the offline cache)."""
    if storage.is_remote(source):
        try:
            return storage.local_copy(source, complete_marker="model_index.json")
        except OSError as e:  # missing, unreachable or not completely written
            raise PipelineError(f"{source}: could not copy the pipeline folder to the local cache "
                                f"{storage.cache_root()} ({e})") from None
    if os.path.isdir(source):
        return source
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise PipelineError(f"{source}: no such folder, and not a Hub repo id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline without a cached copy, unknown repo, gated repo, ...
        raise PipelineError(
            f"{source}: could not get it from the Hugging Face Hub or its local cache ({type(e).__name__}); "
            "download it once with network access, or pass a local diffusers folder"
        ) from None


def component_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise PipelineError(
            f"{root} has no {name}/ folder; a diffusers Stable Diffusion folder holds "
            f"{', '.join(c + '/' for c in COMPONENTS)} and model_index.json"
        )
    return path


def load_tokenizer(folder: str):
    """The CLIP tokenizer from transformers (tokenizer code only; no model code is used)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:
        raise PipelineError(f"{folder}: not a CLIP tokenizer folder (vocab.json, merges.txt) ({e})") from None


SDXL_PIPELINE = "StableDiffusionXLPipeline"


def sdxl_sign(root: str) -> Optional[str]:
    """What marks an SDXL folder (model_index.json's class, a text_encoder_2/, or an SDXL UNet config:
    addition_embed_type='text_time'), or None for SD 1.x/2.x."""
    if model_index(root).get("_class_name") == SDXL_PIPELINE:
        return f"model_index.json names {SDXL_PIPELINE}"
    if os.path.isdir(os.path.join(root, "text_encoder_2")):
        return "it has a text_encoder_2/"
    unet_config = os.path.join(root, "unet", "config.json")
    if os.path.isfile(unet_config) and storage.read_json(unet_config, PipelineError).get(
            "addition_embed_type") == "text_time":
        return "unet/config.json has addition_embed_type='text_time'"
    return None


def model_index(root: str) -> dict:
    index = os.path.join(root, "model_index.json")
    return storage.read_json(index, PipelineError) if os.path.isfile(index) else {}


@dataclasses.dataclass
class StableDiffusion:
    """The frozen parts of a Stable Diffusion (or SDXL) pipeline as Flax modules plus parameter trees.

    For SDXL, ``text_encoder`` is both encoders in one module (models.text_encoder.SDXLTextEncoders, its
    params under their folders' names) and ``tokenizer_2`` is the second tokenizer; prompts then encode to an
    ``SDXLConditioning`` (models.conditioning) instead of one array."""

    root: str
    unet: Any = None
    unet_params: Any = None
    vae: Any = None
    vae_params: Any = None
    text_encoder: Any = None
    text_params: Any = None
    tokenizer: Any = None
    schedule: Any = None
    sdxl: bool = False
    tokenizer_2: Any = None
    # diffusers' StableDiffusionXLPipeline option: the empty prompt's conditioning is zeros, not its encoding.
    force_zeros_for_empty_prompt: bool = False
    _encode: dict = dataclasses.field(default_factory=dict, repr=False)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids padded/truncated to the tokenizer's length, as diffusers' pipelines do: (B, L), or for
        SDXL (B, 2, L), one row per tokenizer."""
        ids = lambda tokenizer: np.asarray(tokenizer(list(prompts), padding="max_length", truncation=True,
                                                     max_length=tokenizer.model_max_length).input_ids, np.int32)
        if self.sdxl:
            return np.stack([ids(self.tokenizer), ids(self.tokenizer_2)], axis=1)
        return ids(self.tokenizer)

    def image_size(self, latent_hw: Sequence[int]) -> tuple:
        """(h, w) pixels that latents of (h, w) decode to: what SDXL's time ids say of an image."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return tuple(int(v) * factor for v in latent_hw)

    def token_shape(self, prompts: int) -> tuple:
        """The shape of ``tokenize``'s ids for that many prompts, from the text encoders' configs alone."""
        length = self.text_encoder.config.max_position_embeddings
        return (prompts, 2, length) if self.sdxl else (prompts, length)

    def encode_text(self, prompts: Sequence[str], image_size: Optional[tuple] = None):
        """What the UNet attends to: ``last_hidden_state`` of the text encoder, or for SDXL its
        ``SDXLConditioning`` with the time ids of ``image_size`` (h, w pixels; SD ignores it)."""
        encoder, key = self.text_encoder, None
        if self.sdxl:  # SDXLTextEncoders refuses a missing size by name
            key = None if image_size is None else tuple(int(v) for v in image_size)
            encoder = encoder.clone(image_size=key)
        if key not in self._encode:
            self._encode[key] = jax.jit(lambda p, ids: encoder.apply({"params": p}, ids))
        return self._encode[key](self.text_params, jnp.asarray(self.tokenize(prompts)))

    def encode_uncond(self, image_size: Optional[tuple] = None):
        """The empty prompt's conditioning, one row, as the diffusers pipeline makes its negative: the
        encoding of "", or zeros (time ids kept) with ``force_zeros_for_empty_prompt``."""
        uncond = self.encode_text([""], image_size)
        if self.force_zeros_for_empty_prompt:
            uncond = uncond.replace(context=jnp.zeros_like(uncond.context),
                                    text_embeds=jnp.zeros_like(uncond.text_embeds))
        return uncond


def load_pipeline(
    source: str,
    components: Sequence[str] = COMPONENTS,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    unet_remat: str = "none",
) -> StableDiffusion:
    """Load the named components of a diffusers SD or SDXL pipeline from a folder, bucket or Hub id. For SDXL,
    "tokenizer" and "text_encoder" bring their ``_2`` twins."""
    from ..models.text_encoder import load_sdxl_text_encoders, load_text_encoder
    from ..models.unet import load_unet
    from ..models.vae import load_vae
    from ..schedule import NoiseSchedule

    root = resolve(source)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise PipelineError(f"unknown pipeline components {sorted(unknown)}; known: {list(COMPONENTS)}")
    sign = sdxl_sign(root)
    sdxl = sign is not None
    dirs = {name: component_dir(root, name) for name in components}
    for name in (SDXL_SECOND[c] for c in components if sdxl and c in SDXL_SECOND):
        if not os.path.isdir(os.path.join(root, name)):
            raise PipelineError(f"{root} is an SDXL pipeline ({sign}) but has no {name}/ folder; an SDXL folder "
                                f"holds {', '.join(c + '/' for c in COMPONENTS + tuple(SDXL_SECOND.values()))} "
                                "and model_index.json")
        dirs[name] = os.path.join(root, name)
    pipe = StableDiffusion(root=root, sdxl=sdxl,
                           force_zeros_for_empty_prompt=sdxl and model_index(root).get("force_zeros_for_empty_prompt",
                                                                                       True))
    if "scheduler" in dirs:
        scheduler_config = os.path.join(dirs["scheduler"], "scheduler_config.json")
        pipe.schedule = NoiseSchedule.from_config(storage.read_json(scheduler_config, PipelineError))
    if "tokenizer" in dirs:
        pipe.tokenizer = load_tokenizer(dirs["tokenizer"])
    if "tokenizer_2" in dirs:
        pipe.tokenizer_2 = load_tokenizer(dirs["tokenizer_2"])
    if "text_encoder" in dirs and sdxl:
        pipe.text_encoder, pipe.text_params = load_sdxl_text_encoders(dirs["text_encoder"], dirs["text_encoder_2"],
                                                                      dtype, param_dtype)
    elif "text_encoder" in dirs:
        pipe.text_encoder, pipe.text_params = load_text_encoder(dirs["text_encoder"], dtype, param_dtype)
    if "vae" in dirs:
        pipe.vae, pipe.vae_params = load_vae(dirs["vae"], dtype, param_dtype)
    if "unet" in dirs:
        pipe.unet, pipe.unet_params = load_unet(dirs["unet"], dtype, param_dtype, remat=unet_remat)
    return pipe
