"""Tiny random PyTorch reference models (diffusers / transformers), shaped like SD 2.1 and SD 1.5.

Tests build these, ``save_pretrained`` them, load them through our loader and
compare outputs. Torch is a test-only dependency.
"""

import os
import shutil

import torch

UNET_CONFIGS = {
    # SD 2.x traits: dense proj_in/out, per-block head counts, 1024-style context.
    "sd21": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32,
        use_linear_projection=True,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
    ),
    # SD 1.x traits: 1x1-conv proj_in/out, one int head count.
    "sd15": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=24,
        use_linear_projection=False,
        norm_num_groups=8,
    ),
}

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

TEXT_CONFIGS = {
    "sd21": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="gelu", max_position_embeddings=77, vocab_size=1000, projection_dim=32,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "sd15": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=1000, projection_dim=24,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1),
}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-inits some output layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("norm" in name):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def make_unet(kind: str = "sd21", seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**UNET_CONFIGS[kind]), seed)


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**VAE_CONFIG), seed)


def make_text_encoder(kind: str = "sd21", seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize(CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS[kind])), seed)


# A tiny SDXL-shaped pipeline: UNet with text_time conditioning, no attention in the first block and two
# transformer layers in the second; text_encoder (quick_gelu, 24 wide) and text_encoder_2 (a projection model,
# gelu, 32 wide, pooled 16): context 24 + 32 = 56, added embedding 16 + 6 time ids x 8.
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=56,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
SDXL_TEXT = {
    "text_encoder": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         hidden_act="quick_gelu", max_position_embeddings=77, projection_dim=24),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           hidden_act="gelu", max_position_embeddings=77, projection_dim=16),
}
# SDXL base 1.0's scheduler_config.json
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear",
                      use_karras_sigmas=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
                      clip_sample=False)


def save_sdxl_pipeline(folder: str, corpus, seed: int = 0) -> str:
    """A tiny random SDXL pipeline saved by diffusers' ``StableDiffusionXLPipeline.save_pretrained`` (its
    model_index.json with ``force_zeros_for_empty_prompt``), tokenizers by rule from ``corpus``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from swiftbrush_jax.files import diffusers_writer as dio

    tokenizers, encoders = [], []
    for i, (name, cls) in enumerate((("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))):
        words = os.path.join(folder, "words", name)
        vocab = dio.write_clip_tokenizer(words, corpus)
        tokenizers.append(CLIPTokenizer.from_pretrained(words))
        config = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                pad_token_id=vocab - 1, **SDXL_TEXT[name])
        encoders.append(randomize(cls(config), seed + i))
    vae = randomize(AutoencoderKL(**VAE_CONFIG, scaling_factor=0.13025), seed + 2)
    unet = randomize(UNet2DConditionModel(**SDXL_UNET), seed + 3)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(os.path.join(folder, "words"))
    return folder
