"""`python -m pipeline.tokenizer train|extend ...`: the one place that parses flags into configs.

Examples:
    python -m pipeline.tokenizer train --input en.jsonl --vocab-size 8000 --out en.model
    python -m pipeline.tokenizer extend --base en.model --input de.jsonl --old-input en.jsonl \\
        --new-pieces 8000 --out en+de.model      # also writes en+de.report.json

Both run the same under `ray job submit -- python -m pipeline.tokenizer ...` (they join the cluster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.errors import report_pipeline_error
from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer
from pipeline.tokenizer.sample import HOLDOUT_FRACTION
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", action="extend", required=True, dest="inputs",
                        help="input files, folders or globs, as the tokenize job reads them (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="the .model file to write")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    parser.add_argument("--max-sample-bytes", type=int, default=200_000_000,
                        help="train on at most this many bytes, chosen by hash (default: 200 MB)")
    parser.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION,
                        help="share of documents (by hash) never trained on, kept for measuring (default: 0.05)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a SentencePiece model on a sample of a corpus")
    _common(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--byte-fallback", action="store_true", help="spell unknown characters as UTF-8 bytes")
    train.add_argument("--character-coverage", type=float, default=0.9995)

    extend = commands.add_parser("extend", help="append pieces learned on a new corpus to an existing model")
    _common(extend)
    extend.add_argument("--base", type=Path, required=True, help="the SentencePiece .model to extend")
    extend.add_argument("--old-input", nargs="+", action="extend", required=True, dest="old_inputs",
                        help="text like the base's corpus: its held-out slice checks old text does not get worse")
    extend.add_argument("--new-pieces", type=int, required=True,
                        help="append at most this many pieces; every character of the new text that the base "
                        "lacks is one of them")
    extend.add_argument("--max-heldout-bytes", type=int, default=20_000_000,
                        help="measure bytes per token on at most this much held-out text (default: 20 MB)")
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerTrainConfig | ExtendConfig:
    common = dict(
        inputs=tuple(args.inputs), out=args.out, text_field=args.text_field, max_sample_bytes=args.max_sample_bytes,
        holdout_fraction=args.holdout_fraction, overwrite=args.overwrite, ray_address=args.ray_address,
        num_cpus=args.num_cpus,
    )
    if args.command == "train":
        return TokenizerTrainConfig(vocab_size=args.vocab_size, model_type=args.model_type, byte_fallback=args.byte_fallback,
                           character_coverage=args.character_coverage, **common)
    return ExtendConfig(base=args.base, old_inputs=tuple(args.old_inputs), new_pieces=args.new_pieces,
                        max_heldout_bytes=args.max_heldout_bytes, **common)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        if isinstance(config, TokenizerTrainConfig):
            train_tokenizer(config)
        else:
            extend_tokenizer(config)
    except Exception as e:  # noqa: BLE001 - ours (also inside a Ray task error) become one line; a bug re-raises
        return report_pipeline_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
