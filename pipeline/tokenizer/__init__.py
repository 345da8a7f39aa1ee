"""Tokenizers: train a SentencePiece model, and extend one for a new corpus without moving old ids.

`python -m pipeline.tokenizer train|extend` is the command line (`__main__.py`); `train.py` and
`extend.py` are the two commands, `model_proto.py` the only code that touches a model's pieces, and
`report.py` the extension report, which the trainer reads with `ExtensionReport.load`.

Nothing is imported here: the trainer imports `report.py` alone, without the Ray-based commands.
"""
