"""SwiftBrush on a laptop: distil the shipped shapes teacher (swiftbrush_jax/toy/teacher) on a CPU.

    python -m swiftbrush_jax.train --config configs/shapes.py --workdir runs/shapes
    python -m swiftbrush_jax.train --config configs/shapes.py:v2_b --workdir runs/shapes_v2_b

The paper's method with its constants scaled to a 1.7M-parameter teacher and a run of minutes instead of 250k
steps. The measurements behind these choices, and what the student reaches: docs/shapes.md.

* student lr 5e-5 (paper 1e-6): Adam moves each weight by about lr per step; 1e-6 would leave a copy of the teacher.
* five LoRA-teacher updates per student update at the paper's LoRA lr 1e-3: the LoRA teacher must keep up
  with the student's distribution (the paper's learns 1000x faster than its student). With one update and a
  student at 2e-4 it did not, and VSD covered open prompts no better than SDS; this pair came closest to
  the teacher in the search of docs/shapes_search.md.
* batch 8, 1200 steps: 13 to 16 minutes on the 2-core development VMs (docs/shapes.md).
* LoRA rank 8 (paper 64 on 320-1280 wide layers; here 32-64 wide), alpha keeping the paper's alpha / rank.
* CFG 3 for the teacher (paper 4.5).
* LoRA teacher at CFG 1, conditional only (official code: the teacher's; ProlificDreamer's VSD: 1): the LoRA
  teacher starts as the teacher, so at equal scales the guided scores cancel, guidance direction included.
* float32 everywhere (CPU).

The variant (after the colon; default v1):
* v1: the recipe above; also SwiftBrush v2's student A (no SD-Turbo exists here to start it from).
* v2_b: SwiftBrush v2's student B in this world (docs/method.md §6): a LoRA student (rank 32 on 64-wide
  attention, alpha 2 x rank as v2's 256 / 512, lr 1e-3 as its adapters start at zero; the LoRA teacher's
  settings carry over) trained with VSD and the
  clamped CLIP loss through the teacher's VAE decoder and the world's own CLIP (shipped at
  swiftbrush_jax/toy/teacher/clip, made by toy.make_teacher).
Merge A and B: ``python -m swiftbrush_jax.merge --weight 0.5 --out merged runs/a runs/b``.
"""

import os

from swiftbrush_jax.config_base import Variants, base_config
from swiftbrush_jax.toy import teacher_path

# The CLIP loss's tau: v2's 0.35 sits near the cosine a real image has with its caption under CLIP ViT-B/32;
# the world's CLIP gives a true render about 0.5 with any caption that describes it (docs/shapes.md), so 0.45
# binds only on an image that a true render of its prompt would beat.
CLIP_TAU = 0.45



def get_config(variant: str = "v1"):
    c = base_config()
    c.teacher = teacher_path()
    c.prompts = "shapes"
    c.validation_prompts = ("a red circle", "a yellow square", "a green triangle", "a blue circle",
                            "a magenta square", "a circle", "a red shape", "a shape")
    c.batch_size = 8
    c.total_steps = 1200
    c.log_every = 25
    c.checkpoint_every = 400
    c.sample_every = 200
    c.lora.rank = 8
    c.lora.alpha = 8 * 108.0 / 64
    c.student_optimizer.lr = 5e-5
    c.lora_optimizer.lr = 1e-3
    c.vsd.lora_updates_per_step = 5
    c.vsd.guidance_scale = 3.0
    c.vsd.lora_guidance_scale = 1.0
    c.teacher_dtype = "float32"
    c.student_compute_dtype = "float32"
    c.update_from_flattened_dict(Variants(__file__,
        v1={},
        v2_b={"student_lora.rank": 32, "student_lora.alpha": 64.0,
              "student_optimizer.lr": 1e-3,  # adapters start at zero; the LoRA teacher's rate
              "vsd.clip_weight": 0.1, "vsd.clip_tau": CLIP_TAU, "vsd.clip_anneal_steps": c.total_steps,
              "clip_model": os.path.join(teacher_path(), "clip"),
              "clip_decoder": ""},  # the teacher's own (tiny) VAE decoder
    )[variant])
    return c
