"""Tokenizers: train one, or extend one for a new corpus without moving old ids.

A tokenizer is a SentencePiece `.model` or a Hugging Face tokenizer folder (`load.py` opens either and is
the one place that knows the kinds). `python -m pipeline.tokenizer train|extend` is the command line
(`__main__.py`); `train.py` and `extend.py` are the two commands, `model_proto.py` the only code that
touches a SentencePiece model's pieces, `bpe.py` the extension of a BPE `tokenizer.json`, and `report.py`
the extension report, which the trainer reads with `ExtensionReport.load`.

Nothing is imported here: the trainer imports `report.py` alone, without the Ray-based commands.
"""
