"""SwiftBrush on SDXL: the SDXL base 1.0 teacher at 1024 px with the paper's constants (docs/sdxl.md).

    python -m swiftbrush_jax.train --config configs/sdxl.py --workdir runs/sdxl
    python -m swiftbrush_jax.train --config configs/sdxl.py:turbo --workdir runs/sdxl_turbo
    python -m swiftbrush_jax.train --config configs/sdxl.py:lora --workdir runs/sdxl_lora

The variant (after the colon; default base):
* base: a full student initialised from the teacher, as the paper does for SD 2.1.
* turbo: a full student initialised from SDXL-Turbo (same architecture), as SwiftBrush v2 starts from SD-Turbo.
* lora: SwiftBrush v2's student B without its CLIP loss: LoRA rank 256, alpha 512 on the frozen teacher, so
  that no third copy of the 2.6B-parameter UNet is held. The CLIP loss is not supported for SDXL yet.
What carries over from the paper unchanged: learning rates (student 1e-6, LoRA teacher 1e-3), LoRA teacher rank
64, CFG 4.5 for both teachers, t in [20, 980], EMA 0.9999, prompt dropout 0.1. SDXL's time ids are those of the
training size, crops (0, 0). What fits where: docs/sdxl.md.
"""

from swiftbrush_jax.config_base import Variants, base_config


def get_config(variant: str = "base"):
    c = base_config()
    c.teacher = "stabilityai/stable-diffusion-xl-base-1.0"
    c.prompts = "prompts/journeydb.txt"
    c.batch_size = 16  # per the paper's GPU; use 16 x devices on a pod
    c.total_steps = 250_000
    c.latent_size = 128  # 1024 px, SDXL's native size; 64 trains at 512 px
    c.remat = "full"
    c.attention_query_block = 128
    c.update_from_flattened_dict(Variants(__file__,
        base={},
        turbo={"student_init": "stabilityai/sdxl-turbo"},
        lora={"student_lora.rank": 256, "student_lora.alpha": 512.0},
    )[variant])
    return c
