"""Train a tokenizer on a corpus, or extend one with the pieces of a new corpus while every existing id
keeps its piece. A tokenizer is a SentencePiece .model or a Hugging Face tokenizer folder (SentencePiece or
BPE, as open models ship them).

Examples:
    python -m pipeline.tokenizer train --input en.jsonl --vocab-size 8000 --out en.model
    python -m pipeline.tokenizer train --kind bpe --input en.jsonl --vocab-size 32000 --out en-tokenizer/
    python -m pipeline.tokenizer extend --base en.model --input de.jsonl --old-input en.jsonl \\
        --new-pieces 8000 --out en+de.model      # also writes en+de.report.json
    python -m pipeline.tokenizer extend --base llama3-folder/ --input de.jsonl --old-input en.jsonl \\
        --new-pieces 8000 --out llama3+de/       # a folder, with extension_report.json inside
    python -m pipeline.tokenizer extend --base llama3-folder/ --input de.jsonl --old-input en.jsonl \
        --new-pieces 8000 --keep-old-encoding --out llama3+de-kept/   # English keeps its ids

Both run the same under `ray job submit -- python -m pipeline.tokenizer ...` (they join the cluster).
This module is the command line: it parses the flags into a `train.py` or `extend.py` config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.command import HelpFormatter, add_input_flags, add_ray_flags, new_parser, run_command
from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer
from pipeline.tokenizer.sample import HOLDOUT_FRACTION
from pipeline.tokenizer.train import KINDS, TokenizerTrainConfig, train_tokenizer

DESCRIPTION, EXAMPLES = __doc__.split("\n\n")[:2]


def _common(parser: argparse.ArgumentParser) -> None:
    add_input_flags(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="what to write: a .model file (SentencePiece only) or a Hugging Face tokenizer folder")
    parser.add_argument("--max-sample-bytes", type=int, default=TokenizerTrainConfig.max_sample_bytes,
                        help="train on at most this many bytes of text, documents chosen by a hash of their text")
    parser.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION,
                        help="share of documents (by hash) never trained on, kept for measuring")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_ray_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m pipeline.tokenizer", DESCRIPTION, EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,extend}")

    train = commands.add_parser("train", help="train a tokenizer on a sample of a corpus",
                                description="Train a tokenizer on a hash-chosen sample of a corpus: a SentencePiece "
                                            "model (a .model file, or a Hugging Face folder when --out is not a "
                                            ".model) or a byte-level BPE Hugging Face folder.",
                                formatter_class=HelpFormatter, allow_abbrev=False)
    _common(train)
    train.add_argument("--vocab-size", type=int, required=True, help="pieces in the model, special pieces included")
    train.add_argument("--kind", choices=KINDS, default=TokenizerTrainConfig.kind,
                       help="sentencepiece (Llama 2, Mistral, Gemma) or bpe: byte-level BPE (Llama 3, Qwen, GPT-2)")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default=TokenizerTrainConfig.model_type,
                       help="SentencePiece's algorithm (--kind sentencepiece)")
    train.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=TokenizerTrainConfig.byte_fallback,
                       help="spell characters outside the pieces as UTF-8 byte pieces, never <unk>, as Llama 2's "
                            "and Mistral's tokenizers do (256 ids); --no-byte-fallback lets them become <unk> (default: on)")
    train.add_argument("--character-coverage", type=float, default=TokenizerTrainConfig.character_coverage,
                       help="share of the sample's characters the model must cover; the rarest rest are spelled as "
                            "bytes (<unk> with --no-byte-fallback)")

    extend = commands.add_parser("extend", help="append pieces learned on a new corpus to an existing tokenizer",
                                 description="Append pieces learned on a new corpus to an existing tokenizer "
                                             "(a SentencePiece .model, or a Hugging Face folder: SentencePiece or "
                                             "BPE); ids 0..V-1 keep their pieces. Also writes the extension report "
                                             "(beside a .model, inside a folder).",
                                 formatter_class=HelpFormatter, allow_abbrev=False)
    _common(extend)
    extend.add_argument("--base", type=Path, required=True, metavar="PATH",
                        help="the tokenizer to extend: a SentencePiece .model or a Hugging Face tokenizer folder "
                             "(--out is then a folder too)")
    extend.add_argument("--old-input", nargs="+", action="extend", default=[], dest="old_inputs", metavar="PATH",
                        help="text like the base's corpus: its held-out slice checks old text does not get worse "
                             "(required; no default)")
    extend.add_argument("--new-pieces", type=int, required=True,
                        help="append at most this many pieces; every character of the new text that the base "
                        "lacks is one of them")
    extend.add_argument("--max-heldout-bytes", type=int, default=ExtendConfig.max_heldout_bytes,
                        help="measure bytes per token on at most this much held-out text")
    extend.add_argument("--keep-old-encoding", action="store_true",
                        help="add no piece (SentencePiece) or merge (BPE) that changes how a sample of --old-input "
                             "is cut, so old text keeps its ids (held-out old lines up to what the sample missed; "
                             "the report counts them); needs --old-input")
    extend.add_argument("--max-old-sample-bytes", type=int, default=ExtendConfig.max_old_sample_bytes,
                        help="with --keep-old-encoding: the size of the old sample whose encoding is kept "
                             "(documents outside the held-out slice, chosen by hash)")
    extend.add_argument("--byte-fallback", action="store_true",
                        help="a SentencePiece base without byte fallback gets the 256 byte pieces after every old "
                             "id, so no character is ever <unk> (a base with it, or a byte-level BPE one, keeps "
                             "its own)")
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerTrainConfig | ExtendConfig:
    common = dict(
        inputs=tuple(args.inputs), out=args.out, text_field=args.text_field, split=args.split,
        max_sample_bytes=args.max_sample_bytes, holdout_fraction=args.holdout_fraction, overwrite=args.overwrite,
        address=args.address, num_cpus=args.num_cpus,
    )
    if args.command == "train":
        return TokenizerTrainConfig(vocab_size=args.vocab_size, kind=args.kind, model_type=args.model_type,
                                    byte_fallback=args.byte_fallback,
                                    character_coverage=args.character_coverage, **common)
    return ExtendConfig(base=args.base, old_inputs=tuple(args.old_inputs), new_pieces=args.new_pieces,
                        max_heldout_bytes=args.max_heldout_bytes, keep_old_encoding=args.keep_old_encoding,
                        max_old_sample_bytes=args.max_old_sample_bytes, byte_fallback=args.byte_fallback, **common)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)

    def work() -> Path:
        if isinstance(config, TokenizerTrainConfig):
            train_tokenizer(config)
        else:
            extend_tokenizer(config)
        return config.out

    paths = {"--input": config.inputs, "--out": config.out}
    if isinstance(config, ExtendConfig):
        paths |= {"--base": config.base, "--old-input": config.old_inputs}
    return run_command(work, paths, args.debug)


if __name__ == "__main__":
    sys.exit(main())
