"""Writing diffusers-format pipeline folders (what ``StableDiffusionPipeline.from_pretrained`` reads)."""

import json
import os
import shutil
from typing import Iterable, Optional

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


def write_model_index(root: str, scheduler_class: str = "DDIMScheduler", base: Optional[dict] = None) -> None:
    """``model_index.json``: an SD pipeline's, or ``base`` (a teacher's, as an SDXL one with its options) with
    the scheduler replaced."""
    write_json(os.path.join(root, "model_index.json"),
               {**(MODEL_INDEX if base is None else base), "scheduler": ["diffusers", scheduler_class]})


def copy_components(src_root: str, dst_root: str, names: Iterable[str]) -> None:
    """Copy component folders verbatim (following Hub-cache symlinks), so they stay bit-identical."""
    for name in names:
        shutil.copytree(os.path.join(src_root, name), os.path.join(dst_root, name), symlinks=False)


# CLIP's start and end tokens; the end token also pads and stands for unknown words.
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def write_clip_tokenizer(folder: str, corpus: Iterable[str], max_length: int = 77) -> int:
    """A small CLIP-style BPE tokenizer (vocab.json + merges.txt) whose words are ``corpus``'s; returns its size.

    Real pipelines ship OpenAI's CLIP vocabulary; tiny and toy pipelines need
    one that fits their tiny text encoders. The vocabulary is built by rule, not
    trained (the tokenizers trainer breaks ties in hash order, so two runs differ):
    every character, alone and word-final, then each word's left-to-right merges.
    Words outside the corpus still tokenize, character by character.
    """
    words = sorted({w for text in corpus for w in text.lower().split()})
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-") | set("".join(words)))
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            if merged not in tokens:
                tokens.append(merged)
    tokens += CLIP_SPECIALS
    write_bpe_tokenizer(folder, tokens, merges, max_length)
    return len(tokens)


def write_bpe_tokenizer(folder: str, tokens: list, merges: list, max_length: int) -> None:
    """vocab.json (ids in the order of ``tokens``), merges.txt and a CLIPTokenizer config that uses
    <|startoftext|> to open and <|endoftext|> to close and pad, as OpenAI's CLIP vocabulary does."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": CLIP_SPECIALS[0],
        "eos_token": CLIP_SPECIALS[1], "unk_token": CLIP_SPECIALS[1], "pad_token": CLIP_SPECIALS[1]})
