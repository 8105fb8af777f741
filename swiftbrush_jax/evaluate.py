"""Score a generator: the shapes suite on a laptop, or the papers' COCO-2014 and HPSv2 suites.

    python -m swiftbrush_jax.evaluate --suite shapes --model runs/shapes              # one-step EMA student
    python -m swiftbrush_jax.evaluate --suite shapes --model <diffusers folder> --steps 25 --guidance 3
    python -m swiftbrush_jax.evaluate --suite coco2014 --model runs/sd21 --out eval/student \\
        --captions annotations/captions_val2014.json --coco-images val2014/ \\
        --inception inception-2015-12-05.pt --clip-weights open_clip_vit_g14.safetensors --tokenizer sd21/tokenizer
    python -m swiftbrush_jax.evaluate --suite hps --model runs/sd21 --out eval/student-hps \\
        --hps-prompts HPDv2/benchmark --hps-weights HPS_v2_compressed.safetensors --tokenizer sd21/tokenizer
    python -m swiftbrush_jax.evaluate --table eval/student/record.json eval/student-hps/record.json

``--model`` is a training workdir (its EMA student, one step), or a diffusers
folder or Hub id run as ``sample`` runs it (DDIM with classifier-free guidance,
or ``--steps 1``: one call at t = T - 1). Every image starts from the noise of
its own seed. shapes (swiftbrush_jax.evaluators.shapes_suite): accuracy,
coverage, diversity and Frechet distance against true renders, one table row
and a JSON record. coco2014 / hps (swiftbrush_jax.evaluators.paper_suites): FID
and CLIP score, or HPSv2, from PNGs under ``--out`` that a rerun resumes, one
JSON record each; ``--table`` sets records beside the papers' rows
(docs/evaluation.md).
"""

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import ArgumentParser, UsageError, exit_on_user_error
from .evaluators import fid, paper_suites, prompt_sets, records, shapes_suite
from .sample import add_sampling_flags


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser("python -m swiftbrush_jax.evaluate", __doc__)
    parser.add_argument("--suite", choices=["shapes", "coco2014", "hps"], help="the prompt set and its metrics")
    parser.add_argument("--table", nargs="+", metavar="RECORD",
                        help="print these coco2014 / hps JSON records as a markdown table beside the papers'")
    parser.add_argument("--model", help="training workdir (its student), diffusers folder or Hub id")
    parser.add_argument("--step", type=int, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--no-ema", action="store_true", help="workdir: the raw student instead of its EMA")
    add_sampling_flags(parser)
    parser.add_argument("--json", help="write the record here (coco2014 / hps default: <out>/record.json)")

    shapes = parser.add_argument_group("shapes")
    shapes.add_argument("--num-prompts", type=int, default=0,
                        help="first P prompts of the vocabulary: the 18 fully specified, then the 10 under-specified "
                             "(0: all 28)")
    shapes.add_argument("--seeds", type=int, default=8,
                        help="images per prompt and answering (colour, shape): 8 gives 'a circle' 48")
    shapes.add_argument("--grid", help="write an image grid PNG here (one row per prompt, its first --seeds images)")

    papers = parser.add_argument_group("coco2014 and hps")
    papers.add_argument("--out", help="folder for images/, the manifest, prompts.jsonl and record.json")
    papers.add_argument("--batch-size", type=int, default=16, help="generation batch over all local devices")
    papers.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    papers.add_argument("--num-images", type=int,
                        help=f"coco2014: captions to sample (default {paper_suites.DEFAULT_COCO_IMAGES}); hps: first "
                             "N prompts of each style (default all)")
    papers.add_argument("--captions", help="coco2014: annotations/captions_val2014.json")
    papers.add_argument("--sample-seed", type=int, default=prompt_sets.COCO_SAMPLE_SEED,
                        help=f"coco2014: seed of the caption sample (default {prompt_sets.COCO_SAMPLE_SEED})")
    papers.add_argument("--coco-images", help="coco2014: the val2014/ image folder, FID's reference set")
    papers.add_argument("--fid-stats", help="coco2014: .npz cache of the reference statistics "
                                            "(default: <out>/../coco2014_val_fid_stats.npz)")
    papers.add_argument("--inception", help=f"coco2014: clean-fid's TorchScript Inception, {fid.INCEPTION_FILE}")
    papers.add_argument("--clip-weights", help="coco2014: OpenCLIP ViT-g-14 laion2b_s12b_b42k, .safetensors")
    papers.add_argument("--hps-prompts", help="hps: HPDv2's benchmark/ folder (anime.json, concept-art.json, ...)")
    papers.add_argument("--hps-weights", help="hps: the HPSv2 checkpoint (OpenCLIP ViT-H-14), .safetensors")
    papers.add_argument("--tokenizer", help="CLIP tokenizer folder (vocab.json, merges.txt): SD 2.1's tokenizer/")
    papers.add_argument("--score-batch-size", type=int, default=64, help="images per metric batch")
    papers.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image-decoding processes for FID (0: in the main process)")
    papers.add_argument("--generate-only", action="store_true", help="generate, do not score")
    papers.add_argument("--score-only", action="store_true", help="score a complete --out folder, generate nothing")
    return parser.parse_args(argv)


def evaluate_shapes(args: argparse.Namespace) -> None:
    if not args.model:
        raise UsageError("--suite shapes needs --model (a training workdir or a diffusers folder)")
    result = shapes_suite.evaluate(args.model, args.steps, args.guidance, args.num_prompts, args.seeds,
                                   step=args.step, ema=not args.no_ema)
    images = result.pop("images")
    print(shapes_suite.markdown_table([result]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")
    if args.grid:
        shapes_suite.write_grid(args.grid, images, args.seeds)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if bool(args.suite) == bool(args.table):
        raise UsageError("pass --suite shapes|coco2014|hps to evaluate, or --table RECORD... to print records")
    if args.table:
        print(records.markdown_table(records.read_records(args.table)))
    elif args.suite == "shapes":
        evaluate_shapes(args)
    else:
        paper_suites.main(args)


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
