"""Architecture presets: Stable Diffusion 2.1-base and SDXL base 1.0 written out, the tiny smoke-test pipeline,
and the one DDPM schedule SD 2.1 and the tiny pipeline (and the shapes teacher, swiftbrush_jax.toy.teacher_arch)
train with.

The SD 2.1 dicts are the ``config.json`` / ``scheduler_config.json`` files of
the ``stable-diffusion-2-1-base`` diffusers folder, so that memory and FLOP
planning (``swiftbrush_jax.plan``) and the random-weight benchmarks can build
SD 2.1-shaped models on a machine that has never downloaded it; beside them,
the two frozen towers of SwiftBrush v2's CLIP loss that ``configs/sd21_v2.py:b``
names (CLIP ViT-B/32 and TAESD), for the same use.
"""

import os

from ..files import storage
from ..files.pipeline import PipelineError

UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],  # legacy key: these are head counts, head size 64
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SD 2.1's noise schedule, the DDPM training schedule of docs/method.md §2: scaled_linear betas 0.00085..0.012
# over 1000 steps, epsilon prediction.
_SD21_BETAS = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
# The folder ships it as a PNDMScheduler config.
SCHEDULER = {"_class_name": "PNDMScheduler", **_SD21_BETAS, "skip_prk_steps": True, "trained_betas": None}
# The same schedule as the DDPMScheduler config that the tiny pipeline and the shapes teacher are written with.
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", **_SD21_BETAS, "timestep_spacing": "leading"}

SD21_BASE = {"unet": UNET, "text_encoder": TEXT_ENCODER, "vae": VAE, "scheduler": SCHEDULER}

# transformers' openai/clip-vit-base-patch32 config.json, the fields the Flax CLIPModel reads.
CLIP_VIT_B32 = {
    "projection_dim": 512,
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-5},
}

# madebyollin/taesd's config.json: diffusers' AutoencoderTiny defaults.
TAESD = {"_class_name": "AutoencoderTiny"}


# The tiny random SD-2.1-shaped pipeline (swiftbrush_jax.toy.tiny_teacher, configs/tiny.py): every code path of a
# real teacher (per-block head counts, dense projections, gelu text encoder, the DDPM schedule) at a size that
# trains in seconds.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
    flip_sin_to_cos=True, freq_shift=0,
)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="gelu", max_position_embeddings=77, projection_dim=32)
# The words of the tiny pipeline's tokenizer.
TINY_CORPUS = ["a photo of a cat", "a painting of a lighthouse at dusk", "an astronaut riding a horse",
               "a bowl of fruit on a table"] + [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "magenta",
                                                                       "cyan") for s in ("circle", "square", "triangle")]


def read_folder_configs(root: str) -> dict:
    """The same dicts read from a diffusers pipeline folder on disk (an SDXL one's text_encoder_2 too)."""
    files = [("unet", "config.json"), ("text_encoder", "config.json"), ("vae", "config.json"),
             ("scheduler", "scheduler_config.json")]
    if os.path.isdir(os.path.join(root, "text_encoder_2")):
        files.append(("text_encoder_2", "config.json"))
    return {name: storage.read_json(os.path.join(root, name, file), PipelineError) for name, file in files}


# Stable Diffusion XL base 1.0's UNet and two text encoders (config.json of unet/, text_encoder/, text_encoder_2/),
# for planning and shape checks without its weights.
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# CLIP ViT-L/14's text tower (context: its penultimate hidden state, 768 wide).
SDXL_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "projection_dim": 768, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-05,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# OpenCLIP ViT-bigG/14's text tower with its projection (penultimate hidden state, 1280 wide; text_embeds 1280).
SDXL_TEXT_ENCODER_2 = {
    **SDXL_TEXT_ENCODER, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}
# Its VAE: SD's architecture at 1024 px with its own scaling factor, and the scheduler it ships (Euler, SD's betas).
SDXL_VAE = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_SCHEDULER = {**_SD21_BETAS, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                  "timestep_spacing": "leading", "use_karras_sigmas": False}
SDXL_BASE = {"unet": SDXL_UNET, "text_encoder": SDXL_TEXT_ENCODER, "text_encoder_2": SDXL_TEXT_ENCODER_2,
             "vae": SDXL_VAE, "scheduler": SDXL_SCHEDULER}
# Hub ids whose architecture is one of the above, for planning a teacher that is not on disk.
BY_HUB_ID = {"stabilityai/stable-diffusion-xl-base-1.0": SDXL_BASE}

