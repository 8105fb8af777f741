"""Write the official recipe's prompt file from JourneyDB's annotation files (swiftbrush_jax.data.journeydb).

    python -m swiftbrush_jax.prompts_journeydb \\
        --annotations data/train_anno_realease_repath.jsonl.tgz --out prompts/journeydb.txt
"""

import argparse
import sys
from typing import Sequence

from .data.journeydb import EXAMPLE, SUPPORTED, JourneyDBStats, build_prompt_file
from .errors import exit_on_user_error


@exit_on_user_error
def main(argv: Sequence[str] = None) -> JourneyDBStats:
    parser = argparse.ArgumentParser(
        prog="python -m swiftbrush_jax.prompts_journeydb",
        description="Turn JourneyDB's annotation files (their 'prompt' field) into the deduplicated prompt file "
                    "of the official recipe (configs/sd21.py reads prompts/journeydb.txt).",
        epilog=f"example:\n  {EXAMPLE}\n\nannotation files: {SUPPORTED}; folders are searched recursively.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", nargs="+", required=True, metavar="PATH",
                        help="annotation files or folders holding them")
    parser.add_argument("--out", required=True, help="the prompt file to write (one prompt per line, UTF-8)")
    args = parser.parse_args(argv)
    return build_prompt_file(args.annotations, args.out, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
