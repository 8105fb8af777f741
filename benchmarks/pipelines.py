"""The pipeline folder and training config of each benchmark size; both implementations load the same folder.

``tiny``: the random tiny pipeline of the smoke runs, configs/tiny.py.
``shapes``: the shipped shapes teacher (trained weights), configs/shapes.py.
``sd21``: random weights in SD 2.1-base's architecture, configs/sd21.py (GPU machines).
"""

import os
import runpy
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("tiny", "shapes", "sd21")


def training_config(size: str):
    """The ConfigDict of ``configs/<size>.py``, as the trainer would read it."""
    return runpy.run_path(os.path.join(REPO, "configs", f"{size}.py"))["get_config"]()


def write_random_pipeline(folder: str, configs: dict, seed: int = 0) -> None:
    """Build each component with torch's default init and save it in diffusers layout.

    The tokenizer is the tiny pipelines' rule-built BPE over the tiny corpus; its
    ids are valid for any text encoder vocabulary at least as large.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from swiftbrush_jax.files import diffusers_writer as dio
    from swiftbrush_jax.models.presets import TINY_CORPUS as CORPUS

    text = configs["text_encoder"]
    dio.write_clip_tokenizer(os.path.join(folder, "tokenizer"), CORPUS, max_length=text["max_position_embeddings"])
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(os.path.join(folder, "text_encoder"))
    dio.write_scheduler(folder, configs["scheduler"])
    dio.write_model_index(folder, configs["scheduler"]["_class_name"])


def pipeline_folder(size: str, root: str) -> str:
    """The folder of a benchmark size; random ones are written under ``root`` on first use."""
    if size == "tiny":
        from swiftbrush_jax.toy.tiny_teacher import make_tiny_pipeline

        return make_tiny_pipeline(os.path.join(root, "tiny"))
    if size == "shapes":
        from swiftbrush_jax.toy import teacher_path

        return teacher_path()
    if size != "sd21":
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    from swiftbrush_jax.models.presets import SD21_BASE

    folder = os.path.join(root, "sd21")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_random_pipeline(partial, SD21_BASE)
        os.replace(partial, folder)
    return folder
