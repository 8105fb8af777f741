"""Loading a Stable Diffusion pipeline (diffusers layout) from a folder or a Hub id.

Only what the project needs is fetched from the Hub: each component's
``config.json``, its full-precision safetensors and the tokenizer files.
"""

import dataclasses
import os
from typing import Any, Sequence

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
]


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


def refuse_sdxl(root: str) -> None:
    """A PipelineError for an SDXL folder (model_index.json's class, a text_encoder_2/, or an SDXL UNet config:
    addition_embed_type='text_time') until the pipeline, training, sampling and export support SDXL."""
    index = os.path.join(root, "model_index.json")
    name = storage.read_json(index, PipelineError).get("_class_name") if os.path.isfile(index) else None
    unet_config = os.path.join(root, "unet", "config.json")
    addition = (storage.read_json(unet_config, PipelineError).get("addition_embed_type")
                if os.path.isfile(unet_config) else None)
    if name == SDXL_PIPELINE or os.path.isdir(os.path.join(root, "text_encoder_2")) or addition == "text_time":
        raise PipelineError(f"{root}: an SDXL pipeline; its UNet and text encoders load (swiftbrush_jax.models) "
                            "but training, sampling and export of SDXL are not supported yet")


@dataclasses.dataclass
class StableDiffusion:
    """The frozen parts of a Stable Diffusion pipeline as Flax modules plus parameter trees."""

    root: str
    unet: Any = None
    unet_params: Any = None
    vae: Any = None
    vae_params: Any = None
    text_encoder: Any = None
    text_params: Any = None
    tokenizer: Any = None
    schedule: Any = None
    _encode: Any = dataclasses.field(default=None, repr=False)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids padded/truncated to the tokenizer's length, as diffusers' pipelines do."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
        ).input_ids
        return np.asarray(ids, np.int32)

    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """``last_hidden_state`` of the text encoder, what SD's UNet attends to."""
        if self._encode is None:
            self._encode = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids))
        return self._encode(self.text_params, jnp.asarray(self.tokenize(prompts)))


def load_pipeline(
    source: str,
    components: Sequence[str] = COMPONENTS,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    unet_remat: str = "none",
) -> StableDiffusion:
    """Load the named components of a diffusers SD pipeline from a folder or Hub id."""
    from ..models.text_encoder import load_text_encoder
    from ..models.unet import load_unet
    from ..models.vae import load_vae
    from ..schedule import NoiseSchedule

    root = resolve(source)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise PipelineError(f"unknown pipeline components {sorted(unknown)}; known: {list(COMPONENTS)}")
    dirs = {name: component_dir(root, name) for name in components}
    refuse_sdxl(root)
    pipe = StableDiffusion(root=root)
    if "scheduler" in dirs:
        scheduler_config = os.path.join(dirs["scheduler"], "scheduler_config.json")
        pipe.schedule = NoiseSchedule.from_config(storage.read_json(scheduler_config, PipelineError))
    if "tokenizer" in dirs:
        pipe.tokenizer = load_tokenizer(dirs["tokenizer"])
    if "text_encoder" in dirs:
        pipe.text_encoder, pipe.text_params = load_text_encoder(dirs["text_encoder"], dtype, param_dtype)
    if "vae" in dirs:
        pipe.vae, pipe.vae_params = load_vae(dirs["vae"], dtype, param_dtype)
    if "unet" in dirs:
        pipe.unet, pipe.unet_params = load_unet(dirs["unet"], dtype, param_dtype, remat=unet_remat)
    return pipe

