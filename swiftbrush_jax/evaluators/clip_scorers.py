"""OpenCLIP checkpoints run by transformers' CLIPModel: the CLIP score's ViT-g-14 and HPSv2's ViT-H-14.

Both papers' image-text scores are OpenCLIP ViTs (docs/method.md §7): the CLIP score is
OpenCLIP ViT-g-14 ``laion2b_s12b_b42k``; HPSv2 (Wu et al. 2023) is OpenCLIP
ViT-H-14 fine-tuned on human preferences, scored as 100 x the cosine of the
image and prompt embeddings. OpenCLIP itself needs torchvision, whose PyPI
wheels are CUDA builds that do not load with a CPU torch, so the same networks run here as
transformers' ``CLIPModel`` (the same pre-LayerNorm transformer, exact GELU,
class-token pooling, argmax-token text pooling) with the checkpoint's tensors
renamed by ``openclip_to_transformers`` (tests compare against OpenCLIP's own
model). Preprocessing is OpenCLIP's eval transform: bicubic resize of the short
side to 224, centre crop, CLIP mean/std; hpsv2's pads the long side instead,
which is the same for the square images generated here.

Weights are read from safetensors only; a pickled ``.pt``/``.bin`` checkpoint
is refused in one line, so this module never unpickles a file.
"""

import dataclasses
import os
from typing import Dict, List, Sequence

import numpy as np

from ..errors import UsageError
from ..models.clip import CLIP_MEAN, CLIP_STD

# OpenCLIP's model configs (open_clip/model_configs/ViT-g-14.json, ViT-H-14.json), in transformers' terms.
VIT_G_14 = {"projection_dim": 1024,
            "vision": {"hidden_size": 1408, "num_hidden_layers": 40, "num_attention_heads": 16,
                       "intermediate_size": 6144, "patch_size": 14, "image_size": 224},
            "text": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "intermediate_size": 4096, "max_position_embeddings": 77, "vocab_size": 49408}}
VIT_H_14 = {"projection_dim": 1024,
            "vision": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                       "intermediate_size": 5120, "patch_size": 14, "image_size": 224},
            "text": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "intermediate_size": 4096, "max_position_embeddings": 77, "vocab_size": 49408}}


# Buffers an OpenCLIP state dict may hold that are recomputed, not learned.
OPENCLIP_BUFFERS = ("attn_mask",)


def clip_config(arch: Dict, tokenizer):
    """transformers' CLIPConfig of an OpenCLIP architecture dict (VIT_G_14, VIT_H_14 or a small test one)."""
    from transformers import CLIPConfig

    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5}
    text = dict(arch["text"], **common, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text, vision_config=dict(arch["vision"], **common),
                      projection_dim=arch["projection_dim"])


def _layer_names(openclip_prefix: str, hf_prefix: str, layer: int) -> Dict[str, str]:
    """One residual block's OpenCLIP names -> transformers names (attention's fused in_proj handled apart)."""
    src, dst = f"{openclip_prefix}transformer.resblocks.{layer}.", f"{hf_prefix}encoder.layers.{layer}."
    table = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    return {f"{src}{a}.{p}": f"{dst}{b}.{p}" for a, b in table.items() for p in ("weight", "bias")}


def openclip_to_transformers(state: Dict, text_layers: int, vision_layers: int) -> Dict:
    """Rename (and split, transpose) an OpenCLIP ViT state dict into transformers' CLIPModel layout.

    OpenCLIP keeps q, k, v in one ``in_proj`` tensor (torch.nn.MultiheadAttention's
    layout, rows in q, k, v order) and its projections as (width, embed) matrices
    applied as ``x @ proj``; transformers has separate q/k/v Linear layers and
    (embed, width) Linear weights. Every tensor must be used exactly once.
    """
    rename = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    transposed = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
    fused = {}
    for towers in (("", "text_model.", text_layers), ("visual.", "vision_model.", vision_layers)):
        src_prefix, dst_prefix, layers = towers
        for i in range(layers):
            rename.update(_layer_names(src_prefix, dst_prefix, i))
            fused[f"{src_prefix}transformer.resblocks.{i}.attn.in_proj_"] = f"{dst_prefix}encoder.layers.{i}.self_attn."

    out, used = {}, set()
    for key, value in state.items():
        if key.split(".")[-1] in OPENCLIP_BUFFERS:
            used.add(key)
        elif key in rename:
            out[rename[key]] = value
            used.add(key)
        elif key in transposed:
            out[transposed[key]] = value.T.contiguous()
            used.add(key)
    for src, dst in fused.items():
        for kind in ("weight", "bias"):
            if src + kind in state:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), state[src + kind].chunk(3, dim=0)):
                    out[f"{dst}{name}.{kind}"] = part.contiguous()
                used.add(src + kind)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise UsageError(f"{len(unexpected)} tensors of the checkpoint are not those of an OpenCLIP ViT "
                         f"(first: {', '.join(unexpected[:3])})")
    return out


def read_safetensors(path: str, what: str) -> Dict:
    """A checkpoint's tensors from a .safetensors file; pickled formats (.pt, .bin, .ckpt) are refused."""
    if not path:
        raise UsageError(f"{what}: no weights file given")
    if not os.path.isfile(path):
        raise UsageError(f"{what}: {path}: no such file")
    if not path.endswith(".safetensors"):
        raise UsageError(
            f"{what}: {path} is not a .safetensors file; pickled checkpoints can run code when loaded and are "
            f"never read here: pass the weights as safetensors ({os.path.splitext(path)[0]}.safetensors)")
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"{what}: {path} is not a readable safetensors file ({e})") from None
    # A checkpoint saved from torch.nn.DataParallel / DDP names every tensor "module.<name>".
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def preprocess(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """OpenCLIP's eval transform of uint8 HWC images: (n, 3, size, size) float32.

    The short side is resized to ``size`` with PIL bicubic (the long side to
    int(size * long / short), as torchvision's Resize computes it), then the
    centre is cropped and the CLIP mean and std are applied.
    """
    from PIL import Image

    out = []
    for image in images:
        h, w = image.shape[:2]
        short = min(h, w)
        new_w, new_h = (size, int(size * h / w)) if w == short else (int(size * w / h), size)
        resized = np.asarray(Image.fromarray(image).convert("RGB").resize((new_w, new_h), Image.BICUBIC))
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
        out.append(((crop - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return np.stack(out)


@dataclasses.dataclass
class ClipScorer:
    """An OpenCLIP ViT with its tokenizer: cosine similarity of images and texts, pair by pair."""

    model: object  # transformers.CLIPModel, eval mode
    tokenizer: object
    device: object

    def cosine(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(n,) cosine of image i's and text i's embeddings (each L2-normalised), float64."""
        import torch

        ids = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt").input_ids.to(self.device)
        pixels = torch.from_numpy(preprocess(images, self.model.config.vision_config.image_size)).to(self.device)
        with torch.no_grad():
            image_emb = _features(self.model.get_image_features(pixel_values=pixels))
            text_emb = _features(self.model.get_text_features(input_ids=ids))
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (image_emb * text_emb).sum(-1).double().cpu().numpy()


def _features(output):
    """Projected embeddings, whether transformers returns a tensor or (in newer versions) a model output."""
    return output if hasattr(output, "norm") else output.pooler_output


def load_clip(arch: Dict, weights: str, tokenizer_folder: str, what: str) -> ClipScorer:
    """An OpenCLIP ViT from an OpenCLIP-layout safetensors checkpoint and a CLIP tokenizer folder."""
    import torch
    from transformers import CLIPModel

    from ..files.pipeline import PipelineError, load_tokenizer

    state = read_safetensors(weights, what)
    if not tokenizer_folder:
        raise UsageError(f"{what}: no CLIP tokenizer folder given (vocab.json, merges.txt; SD 2.1's tokenizer/ is one)")
    try:
        tokenizer = load_tokenizer(tokenizer_folder)
    except PipelineError as e:
        raise UsageError(f"{what}: {e}") from None
    converted = openclip_to_transformers(state, arch["text"]["num_hidden_layers"], arch["vision"]["num_hidden_layers"])
    model = CLIPModel(clip_config(arch, tokenizer))
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(converted))
    wrong = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k])]
    if missing or wrong:
        first = (missing or wrong)[0]
        raise UsageError(f"{what}: {weights} is not this architecture's checkpoint ({len(missing)} tensors missing, "
                         f"{len(wrong)} of another shape; first: {first})")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ClipScorer(model.eval().to(device), tokenizer, device)


CLIP_SCORE_PREFIX = "A photo depicts "  # docs/method.md §7, as SwiftBrush v2's and DMD2's evaluation scripts prompt it


def clip_score(scorer: ClipScorer, images_and_prompts, batch_size: int) -> float:
    """Mean raw cosine of OpenCLIP ViT-g-14 between each image and "A photo depicts <prompt>"."""
    return float(np.mean(_batched_cosine(scorer, images_and_prompts, batch_size, CLIP_SCORE_PREFIX)))


def hps_scores(scorer: ClipScorer, images_and_prompts, batch_size: int) -> np.ndarray:
    """HPSv2 of each image: 100 x cosine with its prompt (hpsv2's evaluation.py), prompts unprefixed."""
    return 100.0 * _batched_cosine(scorer, images_and_prompts, batch_size, "")


def _batched_cosine(scorer: ClipScorer, images_and_prompts, batch_size: int, prefix: str) -> np.ndarray:
    """Cosines over an iterable of (uint8 image, prompt) pairs, batch by batch."""
    out: List[np.ndarray] = []
    batch: list = []
    for pair in images_and_prompts:
        batch.append(pair)
        if len(batch) == batch_size:
            out.append(scorer.cosine([i for i, _ in batch], [prefix + p for _, p in batch]))
            batch = []
    if batch:
        out.append(scorer.cosine([i for i, _ in batch], [prefix + p for _, p in batch]))
    if not out:
        raise UsageError("no images to score")
    return np.concatenate(out)
