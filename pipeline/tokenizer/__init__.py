"""Tokenizers: train a SentencePiece model, and extend one for a new corpus without moving old ids.

`python -m pipeline.tokenizer train|extend` is the command line (see `__main__.py`); the trainer reads
an extension's report with `load_extension_report`.
"""

from pipeline.tokenizer.extend import ExtendConfig, Extension, extend_model, extend_tokenizer
from pipeline.tokenizer.model_proto import TokenizerError, check_ids_stable, load_model_proto
from pipeline.tokenizer.report import ExtensionReport, load_extension_report, report_path
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer

__all__ = [
    "ExtendConfig",
    "Extension",
    "ExtensionReport",
    "TokenizerError",
    "TokenizerTrainConfig",
    "check_ids_stable",
    "extend_model",
    "extend_tokenizer",
    "load_extension_report",
    "load_model_proto",
    "report_path",
    "train_tokenizer",
]
