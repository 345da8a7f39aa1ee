"""Tokenizers: train one, or extend one for a new corpus without moving old ids.

A tokenizer is a SentencePiece `.model` or a Hugging Face tokenizer folder (`load.py` opens either and is
the one place that knows the kinds). `python -m pipeline.tokenizer train|extend` is the command line
(`__main__.py`); `train.py` and `extend.py` are the two commands, `model_proto.py` the only code that
touches a SentencePiece model's pieces, `sentencepiece_extension.py` the extension of a SentencePiece
model, `bpe.py` the extension of a BPE `tokenizer.json`, `old_encoding.py`
the loop of `extend --keep-old-encoding` (no new piece that changes the old sample's ids), and `report.py`
the extension report, which the trainer reads with `ExtensionReport.load`. `encoding_mix.py` finds datasets
tokenized by a base tokenizer and by its extension in one mix (the service and the trainer warn once).

Nothing is imported here: the trainer imports `report.py` alone, without the Ray-based commands.
"""
