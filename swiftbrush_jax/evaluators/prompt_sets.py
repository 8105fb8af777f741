"""The papers' prompt sets: 30K COCO-2014 validation captions, and the HPSv2 benchmark's four styles.

COCO (docs/method.md §7): images of ``captions_val2014.json`` are drawn without
replacement with a fixed seed and one of each image's five captions is drawn
for it, so a sample never holds two captions of one image. The HPS benchmark
(Wu et al. 2023) is four JSON lists of prompts, ``anime.json``,
``concept-art.json``, ``paintings.json`` and ``photo.json`` (the
``benchmark/`` folder of the HPDv2 dataset), one image per prompt.
"""

import json
import os
import socket
from collections import defaultdict
from typing import Dict, List

import numpy as np

from ..errors import UsageError
from ..files import storage

COCO_SAMPLE_SEED = 2014
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def _read_json(path: str, what: str):
    if not path:
        raise UsageError(f"{what}: no file given")
    return storage.read_json(path, UsageError, what)


def coco_captions(path: str) -> Dict[int, List[str]]:
    """Every image id of a COCO captions file with its captions, as in ``annotations/captions_val2014.json``."""
    shape = 'need {"annotations": [{"image_id": int, "caption": str}, ...]}, as COCO\'s captions_val2014.json'
    data = _read_json(path, "--captions")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not annotations:
        raise UsageError(f"--captions {path}: no \"annotations\" list; {shape}")
    captions: Dict[int, List[str]] = defaultdict(list)
    for i, entry in enumerate(annotations):
        if (not isinstance(entry, dict) or not isinstance(entry.get("image_id"), int)
                or not isinstance(entry.get("caption"), str)):
            raise UsageError(f"--captions {path}: annotation {i} is {str(entry)[:80]!r}; {shape}")
        captions[entry["image_id"]].append(" ".join(entry["caption"].split()))
    return dict(captions)


def sample_coco(captions: Dict[int, List[str]], count: int, seed: int = COCO_SAMPLE_SEED) -> List[Dict]:
    """count {"image_id", "prompt"} rows: images without replacement, one caption each, both by seed."""
    if count > len(captions):
        raise UsageError(f"--num-images {count}: the captions file has only {len(captions)} images")
    rng = np.random.default_rng(seed)
    image_ids = sorted(captions)
    chosen = rng.choice(len(image_ids), size=count, replace=False)
    rows = []
    for index in chosen:
        image_id = image_ids[index]
        rows.append({"image_id": image_id, "prompt": captions[image_id][rng.integers(len(captions[image_id]))]})
    return rows


def hps_prompts(folder: str) -> List[Dict]:
    """{"style", "prompt"} rows of the four HPS benchmark styles, in HPS_STYLES order."""
    if not folder or not os.path.isdir(folder):
        raise UsageError(f"--hps-prompts {folder}: no such folder (need HPDv2's benchmark/ folder with "
                         f"{', '.join(s + '.json' for s in HPS_STYLES)})")
    rows = []
    for style in HPS_STYLES:
        path = os.path.join(folder, style + ".json")
        prompts = _read_json(path, f"--hps-prompts {style}")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"--hps-prompts {path}: need a non-empty JSON list of prompt strings")
        rows += [{"style": style, "prompt": p} for p in prompts]
    return rows


def write_prompt_list(path: str, rows: List[Dict]) -> None:
    """The prompt set as jsonl (index first), or, if it exists, a check that it is the same set.

    Runs of different models into sibling folders then provably used the same
    prompts; a folder that already holds another set is refused rather than mixed.
    """
    lines = [json.dumps({"index": i, **row}, ensure_ascii=False, sort_keys=True) + "\n" for i, row in enumerate(rows)]
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.readlines() != lines:
                raise UsageError(f"{path} holds another prompt set (another captions or prompts file, --num-images or "
                                 "--sample-seed); use another --out folder")
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{socket.gethostname()}.{os.getpid()}.partial"  # pod processes write the same list at once
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(partial, path)
