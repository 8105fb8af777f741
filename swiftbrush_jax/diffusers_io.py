"""Writing diffusers-format pipeline folders (what ``StableDiffusionPipeline.from_pretrained`` reads)."""

import json
import os
import shutil
from typing import Iterable

from .weights import params_to_state_dict, save_state_dict

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_component(folder: str, config: dict, params, weights_name: str) -> None:
    """``config.json`` plus the params as one float32 safetensors file in PyTorch layout."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config)
    save_state_dict(params_to_state_dict(params), os.path.join(folder, weights_name))


def write_scheduler(root: str, scheduler_config: dict) -> None:
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    write_json(os.path.join(root, "scheduler", "scheduler_config.json"), scheduler_config)


def write_model_index(root: str, scheduler_class: str = "DDIMScheduler") -> None:
    write_json(os.path.join(root, "model_index.json"),
               {**MODEL_INDEX, "scheduler": ["diffusers", scheduler_class]})


def copy_components(src_root: str, dst_root: str, names: Iterable[str]) -> None:
    """Copy component folders verbatim (following Hub-cache symlinks), so they stay bit-identical."""
    for name in names:
        shutil.copytree(os.path.join(src_root, name), os.path.join(dst_root, name), symlinks=False)


def write_clip_tokenizer(folder: str, corpus: Iterable[str], vocab_size: int = 400, max_length: int = 77) -> int:
    """A small CLIP-style BPE tokenizer (vocab.json + merges.txt) trained on ``corpus``; returns its size.

    Real pipelines ship OpenAI's CLIP vocabulary; tiny and toy pipelines need
    one that fits their tiny text encoders.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token=specials[1], end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    os.makedirs(folder, exist_ok=True)
    tok.model.save(folder)
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": specials[0],
        "eos_token": specials[1], "unk_token": specials[1], "pad_token": specials[1]})
    return tok.get_vocab_size()
