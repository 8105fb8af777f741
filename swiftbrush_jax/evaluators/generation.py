"""Resumable generation of a prompt set into PNG files plus a manifest, each process its share.

Image i of a prompt set is ``images/{i:05d}.png``, generated from the noise of
seed ``seed + i`` (``sample.seeded_noise``), so any model, process layout or
rerun draws the same noise for the same prompt. On a pod, process k of n
generates the contiguous slice [i * k // n, i * (k + 1) // n) and appends to
its own manifest file; a row (index, prompt, file, seed) is written only after
its PNG is in place, so a rerun skips every image listed and regenerates the
rest. Scoring reads all manifests and insists the set is complete.
"""

import glob
import json
import os
from typing import Dict, List, Sequence

import numpy as np

from ..errors import UsageError

IMAGES_FOLDER = "images"


def process_share(count: int, process_index: int, process_count: int) -> range:
    """The contiguous slice of [0, count) that process process_index of process_count generates."""
    return range(count * process_index // process_count, count * (process_index + 1) // process_count)


def manifest_path(out: str, process_index: int, process_count: int) -> str:
    if process_count == 1:
        return os.path.join(out, "manifest.jsonl")
    return os.path.join(out, f"manifest.p{process_index:03d}-of-{process_count:03d}.jsonl")


def read_manifests(out: str) -> Dict[int, Dict]:
    """Every row of every manifest in out whose PNG exists, by index (a torn last line is ignored)."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "manifest*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a pre-emption
                    continue
                if os.path.isfile(os.path.join(out, row["file"])):
                    rows[row["index"]] = row
    return rows


def generate(sampler, latent_shape, prompts: Sequence[str], out: str, seed: int, indices: Sequence[int],
             manifest: str) -> int:
    """Generate the images of ``indices`` not yet in a manifest; returns how many were generated."""
    from PIL import Image
    from tqdm import tqdm

    from ..generate import to_uint8
    from ..sample import SeededNoise

    os.makedirs(os.path.join(out, IMAGES_FOLDER), exist_ok=True)
    done = read_manifests(out)
    todo = [i for i in indices if i not in done]
    noise = SeededNoise([seed + i for i in todo], latent_shape)
    with open(manifest, "a", encoding="utf-8") as log, tqdm(total=len(indices), initial=len(indices) - len(todo),
                                                           desc="generating", unit="img") as bar:
        for position, image in sampler.images([prompts[i] for i in todo], noise):
            index = todo[position]
            name = os.path.join(IMAGES_FOLDER, f"{index:05d}.png")
            partial = os.path.join(out, name + ".partial.png")
            Image.fromarray(to_uint8(image)).save(partial)
            os.replace(partial, os.path.join(out, name))
            log.write(json.dumps({"index": index, "prompt": prompts[index], "file": name, "seed": seed + index},
                                 ensure_ascii=False) + "\n")
            log.flush()
            bar.update(1)
    return len(todo)


def complete_set(out: str, prompts: Sequence[str]) -> List[Dict]:
    """The manifest rows of every prompt, in order; a missing image or another prompt is a user error."""
    rows = read_manifests(out)
    missing = [i for i in range(len(prompts)) if i not in rows]
    if missing:
        raise UsageError(f"{out}: {len(missing)} of {len(prompts)} images are not generated yet (first index "
                         f"{missing[0]}); rerun the same command (without --score-only) to finish them")
    changed = [i for i in range(len(prompts)) if rows[i]["prompt"] != prompts[i]]
    if changed:
        raise UsageError(f"{out}: image {changed[0]} was generated for another prompt; use a fresh --out folder")
    return [rows[i] for i in range(len(prompts))]


def read_image(out: str, row: Dict) -> np.ndarray:
    """A manifest row's PNG as uint8 HWC RGB."""
    from PIL import Image

    with Image.open(os.path.join(out, row["file"])) as image:
        return np.asarray(image.convert("RGB"))
