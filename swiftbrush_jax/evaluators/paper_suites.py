"""Generate the papers' prompt sets with any of our generators and score them with the papers' metrics.

    python -m swiftbrush_jax.evaluate --suite coco2014 --model runs/sd21 --out eval/student \\
        --captions annotations/captions_val2014.json --coco-images val2014/ \\
        --inception inception-2015-12-05.pt --clip-weights open_clip_vit_g14.safetensors --tokenizer sd21/tokenizer
    python -m swiftbrush_jax.evaluate --suite hps --model runs/sd21 --out eval/student-hps \\
        --hps-prompts HPDv2/benchmark --hps-weights HPS_v2_compressed.safetensors --tokenizer sd21/tokenizer
    python -m swiftbrush_jax.evaluate --table eval/student/record.json eval/student-hps/record.json

``--model`` is a training workdir (its EMA student, one step), or a diffusers
folder or Hub id run by DDIM with classifier-free guidance (``--steps``,
``--guidance``: the teacher baseline), or ``--steps 1``: one call at t = T - 1. Images are PNGs under
``--out/images`` with a manifest; a rerun skips what exists. On a pod each
process generates its share, and one process then reruns with ``--score-only``.
Each evaluation writes one JSON record; ``--table`` prints several records as a
markdown table beside the papers' rows (docs/method.md §6, §7).
"""

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence

from ..errors import ArgumentParser, UsageError
from ..sample import add_sampling_flags
from . import clip_scorers as clip_models, fid, generation, prompt_sets as prompts, records as table

DEFAULT_COCO_IMAGES = 30_000
GENERATOR_FILE = "generator.json"  # which model, steps and guidance made the images


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser("python -m swiftbrush_jax.paper_eval", __doc__)
    parser.add_argument("--suite", choices=["coco2014", "hps"], help="the prompt set and its metrics")
    parser.add_argument("--table", nargs="+", metavar="RECORD", help="print these JSON records as a markdown table")
    parser.add_argument("--model", help="training workdir, diffusers folder or Hub id")
    parser.add_argument("--out", help="folder for images/, the manifest, prompts.jsonl and record.json")
    parser.add_argument("--step", type=int, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--no-ema", action="store_true", help="workdir: the raw student instead of its EMA")
    add_sampling_flags(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch over all local devices")
    parser.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    parser.add_argument("--num-images", type=int,
                        help=f"coco2014: captions to sample (default {DEFAULT_COCO_IMAGES}); hps: first N prompts "
                             "of each style (default all)")
    parser.add_argument("--captions", help="coco2014: annotations/captions_val2014.json")
    parser.add_argument("--sample-seed", type=int, default=prompts.COCO_SAMPLE_SEED,
                        help=f"coco2014: seed of the caption sample (default {prompts.COCO_SAMPLE_SEED})")
    parser.add_argument("--coco-images", help="coco2014: the val2014/ image folder, FID's reference set")
    parser.add_argument("--fid-stats", help="coco2014: .npz cache of the reference statistics "
                                            "(default: <out>/../coco2014_val_fid_stats.npz)")
    parser.add_argument("--inception", help=f"coco2014: clean-fid's TorchScript Inception, {fid.INCEPTION_FILE}")
    parser.add_argument("--clip-weights", help="coco2014: OpenCLIP ViT-g-14 laion2b_s12b_b42k, .safetensors")
    parser.add_argument("--hps-prompts", help="hps: HPDv2's benchmark/ folder (anime.json, concept-art.json, ...)")
    parser.add_argument("--hps-weights", help="hps: the HPSv2 checkpoint (OpenCLIP ViT-H-14), .safetensors")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (vocab.json, merges.txt): SD 2.1's tokenizer/")
    parser.add_argument("--score-batch-size", type=int, default=64, help="images per metric batch")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image-decoding processes for FID (0: in the main process)")
    parser.add_argument("--generate-only", action="store_true", help="generate, do not score")
    parser.add_argument("--score-only", action="store_true", help="score a complete --out folder, generate nothing")
    parser.add_argument("--json", help="where to write the record (default: <out>/record.json)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every input the chosen suite needs, checked before hours of generation rather than after."""
    if bool(args.suite) == bool(args.table):
        raise UsageError("pass --suite coco2014|hps to evaluate, or --table RECORD... to print records")
    if args.table:
        return
    if not args.model or not args.out:
        raise UsageError(f"--suite {args.suite} needs --model and --out")
    if args.generate_only and args.score_only:
        raise UsageError("--generate-only and --score-only exclude each other")
    if args.batch_size < 1 or args.score_batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise UsageError("--batch-size, --score-batch-size and --num-images must be at least 1")
    if args.generate_only:
        return
    needed = {"coco2014": ("inception", "clip_weights", "tokenizer"), "hps": ("hps_weights", "tokenizer")}
    for name in needed[args.suite]:
        path = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if not path:
            raise UsageError(f"--suite {args.suite} scores with {flag}; give the file (see the README's "
                             "'Evaluating like the papers'), or pass --generate-only")
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    if args.suite == "coco2014" and not os.path.isfile(fid_stats_path(args)):
        fid.image_files(args.coco_images, "FID reference (--coco-images)")


def fid_stats_path(args: argparse.Namespace) -> str:
    return args.fid_stats or os.path.join(os.path.dirname(os.path.abspath(args.out)), "coco2014_val_fid_stats.npz")


def suite_prompts(args: argparse.Namespace) -> List[Dict]:
    """The suite's prompt rows, also written to (or checked against) <out>/prompts.jsonl."""
    if args.suite == "coco2014":
        rows = prompts.sample_coco(prompts.coco_captions(args.captions), args.num_images or DEFAULT_COCO_IMAGES,
                                   args.sample_seed)
    else:
        rows = prompts.hps_prompts(args.hps_prompts)
        if args.num_images:
            by_style = {style: [r for r in rows if r["style"] == style] for style in prompts.HPS_STYLES}
            rows = [r for style in prompts.HPS_STYLES for r in by_style[style][:args.num_images]]
    prompts.write_prompt_list(os.path.join(args.out, "prompts.jsonl"), rows)
    return rows


def run_generation(args: argparse.Namespace, texts: List[str]) -> None:
    """Generate this process's missing images, and note the generator in <out>/generator.json for the record."""
    import jax

    from ..sample import BatchedSampler, latent_shape, load_sampling_model, sampling_steps

    share = generation.process_share(len(texts), jax.process_index(), jax.process_count())
    done = generation.read_manifests(args.out)
    if all(i in done for i in share):
        return
    model = load_sampling_model(args.model, args.step, not args.no_ema)
    steps, guidance = sampling_steps(model, args.steps, args.guidance)
    how = "1 step" if steps == 1 else f"{steps} DDIM steps, CFG {guidance:g}"
    generator = {"model": args.model, "description": f"{model.description}, {how}", "steps": steps,
                 "guidance": None if steps == 1 else guidance}
    table.write_record(os.path.join(args.out, GENERATOR_FILE), generator)
    sampler = BatchedSampler(model, args.batch_size, steps, guidance)
    manifest = generation.manifest_path(args.out, jax.process_index(), jax.process_count())
    count = generation.generate(sampler, latent_shape(model), texts, args.out, args.seed, share, manifest)
    print(f"generated {count} images ({generator['description']}) in {args.out}", flush=True)


def score_coco(args: argparse.Namespace, rows: List[Dict]) -> Dict:
    """FID against the COCO reference statistics and the CLIP score of a complete image set."""
    inception = fid.InceptionFeatures(args.inception)
    ref_mu, ref_sigma, ref_count = fid.reference_statistics(args.coco_images, fid_stats_path(args), inception,
                                                            args.score_batch_size, args.workers)
    paths = [os.path.join(args.out, row["file"]) for row in rows]
    mu, sigma = fid.statistics(fid.file_features(paths, inception, args.score_batch_size, args.workers,
                                                 "generated features"))
    scorer = clip_models.load_clip(clip_models.VIT_G_14, args.clip_weights, args.tokenizer,
                                   "CLIP score (--clip-weights)")
    pairs = ((generation.read_image(args.out, row), row["prompt"]) for row in rows)
    return {"fid": fid.frechet_distance(mu, sigma, ref_mu, ref_sigma), "fid_reference_images": ref_count,
            "clip_score": clip_models.clip_score(scorer, pairs, args.score_batch_size)}


def score_hps(args: argparse.Namespace, rows: List[Dict], styles: List[str]) -> Dict:
    """Mean HPSv2 per benchmark style (and over all four)."""
    import numpy as np

    scorer = clip_models.load_clip(clip_models.VIT_H_14, args.hps_weights, args.tokenizer, "HPSv2 (--hps-weights)")
    pairs = ((generation.read_image(args.out, row), row["prompt"]) for row in rows)
    scores = clip_models.hps_scores(scorer, pairs, args.score_batch_size)
    per_style = {s: float(scores[[i for i, t in enumerate(styles) if t == s]].mean()) for s in prompts.HPS_STYLES}
    return {"hpsv2": per_style, "hpsv2_mean": float(np.mean(list(per_style.values())))}


def evaluate(args: argparse.Namespace) -> Optional[Dict]:
    """Generate what is missing, then score and write the record (None when this process only generates)."""
    import jax

    from ..parallel.distributed import _cluster_detected

    if _cluster_detected():  # a TPU pod, SLURM or MPI job: every process learns its index (and so its share)
        if args.score_only:
            raise UsageError("--score-only runs on one host: start it as a single process once every share "
                             "is generated")
        jax.distributed.initialize()
    rows = suite_prompts(args)
    texts = [row["prompt"] for row in rows]
    start = time.time()
    if not args.score_only:
        run_generation(args, texts)
    generation_s = time.time() - start
    if args.generate_only or jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: its share is generated; score on one host "
              "with the same command and --score-only once every process is done", flush=True)
        return None
    complete = generation.complete_set(args.out, texts)
    start = time.time()
    if args.suite == "coco2014":
        scores = score_coco(args, complete)
    else:
        scores = score_hps(args, complete, [row["style"] for row in rows])
    with open(os.path.join(args.out, GENERATOR_FILE), encoding="utf-8") as f:
        generator = json.load(f)
    record = {"suite": args.suite, **generator, "num_images": len(texts),
              "noise_seed": args.seed, "prompts": os.path.join(args.out, "prompts.jsonl"),
              "generation_s": generation_s, "scoring_s": time.time() - start, **scores}
    if args.suite == "coco2014":
        record["caption_sample_seed"] = args.sample_seed
    table.write_record(args.json or os.path.join(args.out, "record.json"), record)
    return record


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    check_args(args)
    if args.table:
        print(table.markdown_table(table.read_records(args.table)))
        return
    record = evaluate(args)
    if record is not None:
        print(table.markdown_table([record], paper_rows=False))
