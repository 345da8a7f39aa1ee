"""`python -m pipeline.tokenizer extend`: append new-corpus pieces to an existing tokenizer.

The base is a SentencePiece `.model`, or a Hugging Face tokenizer folder (`load.py`):
- SentencePiece (a bare `.model`, or a folder with `tokenizer.model`, as Llama 2, Mistral and Gemma ship):
  a donor's pieces appended after every old id (`sentencepiece_extension.py`). A folder is written whole:
  the extended `tokenizer.model` and the `tokenizer.json` transformers converts it to, checked to encode
  the held-out text exactly as the model does.
- A BPE `tokenizer.json` (Llama 3, Qwen, GPT-2/NeoX): new tokens after every old id and new merges after
  every old merge (`bpe.py`).
Either way bytes per token, the `<unk>` share, the characters left unknown and the old lines whose ids
changed are measured on held-out new and old text before anything is written; then the tokenizer and its
report (`report.py`).

Two choices a team extending Llama's or Mistral's tokenizer makes, as options:
- `--keep-old-encoding`: no new piece or merge that changes how a sample of the old corpus is cut
  (`old_encoding.py`), so old text keeps its ids and replay in the base's encoding stays exact;
- `--byte-fallback`: a SentencePiece base without byte fallback gets the 256 byte pieces after every old
  id (ids never move), so no character of any text is lost to `<unk>`. A base with byte fallback keeps
  its byte pieces at their ids either way; a byte-level BPE base spells every byte already.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.dataset import sha256_file
from pipeline.input_selection import check_split_used, select_inputs
from pipeline.tokenizer.model_proto import ModelProto, TokenizerError, has_byte_fallback, load_model_proto
from pipeline.tokenizer.bpe import base_segmentation, bpe_model, covers_every_byte, donor_size, extend_bpe, train_donor
from pipeline.tokenizer.bpe import first_free_id, tokenizer_encoder, vocabulary_by_id
from pipeline.tokenizer.old_encoding import Built, KeptEncoding, OldSample, keep_old_encoding
from pipeline.tokenizer.sentencepiece_extension import extend_model, new_piece_entries
from pipeline.tokenizer.load import HUGGINGFACE, SENTENCEPIECE, SP_MODEL_NAME, TokenizerSpec, load_tokenizer
from pipeline.tokenizer.load import hf_auto_tokenizer, vocabulary_pieces
from pipeline.tokenizer.pieces import check_piece_count
from pipeline.tokenizer.report import (
    FOLDER_REPORT_NAME,
    Encode,
    changed_lines,
    differing,
    comparison,
    encode_lines,
    measure,
    report_path,
    unknown_characters,
    unknown_comparison,
    write_report,
)
from pipeline.tokenizer.sample import HOLDOUT_FRACTION, read_lines
from pipeline.tokenizer.files import fetch, refuse_existing
from pipeline.tokenizer.files import write as write_output
from pipeline.tokenizer.train import load_sample

# Old text may lose at most this share of its bytes per token (the bound).
MAX_OLD_TEXT_LOSS = 0.01
@dataclass(frozen=True)
class ExtendConfig:
    base: Path
    inputs: tuple[str, ...]
    old_inputs: tuple[str, ...]  # required; empty is refused with a message
    new_pieces: int
    out: Path
    text_field: str = "text"
    split: str | None = None  # of `datasets` DatasetDict inputs, new or old
    max_sample_bytes: int = 200_000_000
    max_heldout_bytes: int = 20_000_000
    keep_old_encoding: bool = False  # no new piece that changes the old sample's ids
    max_old_sample_bytes: int = 20_000_000  # the old sample --keep-old-encoding checks (it is encoded each round)
    byte_fallback: bool = False  # add byte fallback to a SentencePiece base that lacks it
    holdout_fraction: float = HOLDOUT_FRACTION
    overwrite: bool = False
    address: str | None = None
    num_cpus: int | None = None


@dataclass(frozen=True)
class StagedExtension:
    """An extended tokenizer written to scratch, not yet measured or placed at --out."""

    path: Path  # the .model file, or the tokenizer folder
    new_pieces: list[dict]  # {"id", "piece", "base_ids", ...} of every added piece, ids ascending
    donor_vocab_size: int
    skipped: int  # donor candidates not added
    base_details: dict  # what the report records of the base beyond its ids (model type, byte fallback)
    byte_fallback: bool = False  # the extension spells every character (byte pieces, or byte-level BPE)
    byte_fallback_added: bool = False  # byte pieces were appended for --byte-fallback
    kept: KeptEncoding | None = None  # with --keep-old-encoding


def files_sha256(spec: TokenizerSpec) -> dict[str, str]:
    if spec.kind == SENTENCEPIECE:
        return {spec.path.name: sha256_file(spec.path)}
    return {name: sha256_file(spec.path / name) for name in spec.files}


def build_report(
    base: TokenizerSpec,
    extended: TokenizerSpec,
    staged: StagedExtension,
    new_heldout: Sequence[str],
    old_heldout: Sequence[str],
) -> dict:
    """The report dict (see `report.py`), measured with each tokenizer's own encoder."""
    base_encode, extended_encode = base.encoder(), extended.encoder()
    new_ids = encode_lines(extended_encode, new_heldout)
    used = {i for ids in new_ids for i in ids if i >= base.vocab_size}
    measures = {
        name: (measure(base_encode, base.unk_id, lines), measure(extended_encode, extended.unk_id, lines))
        for name, lines in (("new_text", new_heldout), ("old_text", old_heldout))
    }
    return {
        "base": {
            "path": str(base.path),
            "kind": base.kind,
            "files_sha256": files_sha256(base),
            "vocab_size": base.vocab_size,
            "model_type": base.model_type,
            **staged.base_details,
        },
        "extended": {"path": str(staged.path), "files_sha256": files_sha256(extended), "vocab_size": extended.vocab_size,
                     "byte_fallback": staged.byte_fallback},
        "donor_vocab_size": staged.donor_vocab_size,
        "pieces_added": len(staged.new_pieces),
        "candidates_skipped": staged.skipped,
        "added_pieces_used_on_new_text": len(used),
        "bytes_per_token": {name: comparison(*pair) for name, pair in measures.items()},
        "unknown_token_rate": {name: unknown_comparison(*pair) for name, pair in measures.items()},
        "unknown_characters": {
            # Without byte fallback a character outside the held-out text may still be <unk>: never "none".
            "possible": not staged.byte_fallback,
            "byte_fallback_added": staged.byte_fallback_added,
            **{name: unknown_characters(base, extended, lines)
               for name, lines in (("new_text", new_heldout), ("old_text", old_heldout))},
        },
        "old_text_changed_lines": changed_lines(base_encode, extended_encode, old_heldout),
        "keep_old_encoding": staged.kept.as_report() if staged.kept else None,
        "new_pieces": staged.new_pieces,
    }


def stage_sentencepiece(base: TokenizerSpec, new_text: Path, new_pieces: int, scratch: Path, byte_fallback: bool,
                        old_lines: Sequence[str] | None) -> StagedExtension:
    """Extend the base's SentencePiece model; a folder base gets a whole folder (see `stage_folder`)."""
    model_file = base.path if base.kind == SENTENCEPIECE else base.path / SP_MODEL_NAME
    encoder_of = None
    if base.kind != SENTENCEPIECE:
        tries = iter(range(1_000_000))

        def folder_encoder(model: ModelProto) -> Encode:
            """A folder's users encode with the tokenizer.json transformers converts from the model, which
            can cut a line otherwise than the model (see `check_converted_folder`): keep that encoding."""
            folder = stage_folder(base, scratch / f"try-{next(tries)}", {SP_MODEL_NAME: model.SerializeToString()},
                                  convert=True)
            encode = load_tokenizer(folder).encoder()
            shutil.rmtree(folder)
            return encode

        encoder_of = folder_encoder

    extension = extend_model(load_model_proto(model_file), new_text, new_pieces, scratch, byte_fallback, old_lines,
                             encoder_of)
    details = {"byte_fallback": has_byte_fallback(extension.base)}
    entries = new_piece_entries(extension)
    model_bytes = extension.model.SerializeToString()
    if base.kind == SENTENCEPIECE:
        staged = scratch / "extended.model"
        staged.write_bytes(model_bytes)
    else:
        staged = stage_folder(base, scratch / "extended", {SP_MODEL_NAME: model_bytes}, convert=True)
    return StagedExtension(staged, entries, extension.donor_vocab_size, extension.skipped, details,
                           byte_fallback=has_byte_fallback(extension.model),
                           byte_fallback_added=extension.reference is not None, kept=extension.kept)


def stage_bpe(base: TokenizerSpec, new_text: Path, new_pieces: int, scratch: Path, byte_fallback: bool,
              old_lines: Sequence[str] | None) -> StagedExtension:
    tokenizer_file = base.path / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    bpe_model(tokenizer_json, tokenizer_file)  # refuses other model types before the donor trains
    every_byte = covers_every_byte(tokenizer_json)
    if byte_fallback and not every_byte:
        raise TokenizerError(
            f"--byte-fallback: {tokenizer_file} is a BPE tokenizer.json that is neither byte-level nor has byte "
            "fallback; adding it to such a file is not supported; extend without --byte-fallback"
        )
    check_piece_count(new_pieces)
    donor = train_donor(tokenizer_json, new_text, donor_size(tokenizer_json, new_pieces))
    kept = None
    if old_lines is None:
        extension = extend_bpe(tokenizer_json, donor, new_pieces, tokenizer_file)
    else:
        old_lines = list(old_lines)
        sample = OldSample(old_lines, encode_lines(tokenizer_encoder(tokenizer_json), old_lines))

        def build(blocked: frozenset, limit: int) -> Built:
            tried = extend_bpe(tokenizer_json, donor, limit, tokenizer_file, blocked)
            encode = tokenizer_encoder(tried.tokenizer_json)
            return Built(tried, vocabulary_by_id(tried.tokenizer_json), encode_lines(encode, old_lines))

        extension, kept = keep_old_encoding(build, sample, first_free_id(tokenizer_json), new_pieces)
    if not extension.added:
        raise TokenizerError("--input: the new text yields no token the base lacks; nothing to extend")
    segments = base_segmentation(tokenizer_json, [token for _, token in extension.added])
    entries = [{"id": i, "piece": token, "base_ids": ids} for (i, token), ids in zip(extension.added, segments)]
    text = json.dumps(extension.tokenizer_json, ensure_ascii=False, indent=2)
    staged = stage_folder(base, scratch / "extended", {"tokenizer.json": text.encode("utf-8")}, convert=False)
    details = {"byte_level": bool(extension.tokenizer_json.get("pre_tokenizer")), "byte_fallback": every_byte}
    return StagedExtension(staged, entries, extension.donor_vocab_size, extension.skipped, details,
                           byte_fallback=every_byte, kept=kept)


def stage_folder(base: TokenizerSpec, target: Path, replaced: dict[str, bytes], convert: bool) -> Path:
    """A Hugging Face folder: the base's tokenizer files with `replaced` written over them. With `convert`
    (a new tokenizer.model), the stale tokenizer.json is dropped and transformers writes the folder anew
    from the model, as `save_pretrained` would for the model's users; the config is told the base's
    BOS/EOS rule first, which the dropped tokenizer.json's post-processor may have held alone."""
    target.mkdir(parents=True)
    for name in base.files:
        if name not in replaced and not (convert and name == "tokenizer.json"):
            shutil.copyfile(base.path / name, target / name)
    for name, data in replaced.items():
        (target / name).write_bytes(data)
    if convert:
        config_file = target / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        config |= {"add_bos_token": base.add_bos, "add_eos_token": base.adds_eos}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        hf_auto_tokenizer(target).save_pretrained(str(target))
    return target


def check_extended(base: TokenizerSpec, extended: TokenizerSpec, added: int, where: Path) -> None:
    """Every old id keeps its string and the new ids follow them; else nothing is written."""
    if extended.vocab_size != base.vocab_size + added:
        raise TokenizerError(
            f"{where}: the extended tokenizer loads with {extended.vocab_size} ids, not {base.vocab_size} + {added}; "
            "not written"
        )
    old, new = vocabulary_pieces(base), vocabulary_pieces(extended)
    for token_id, (before, after) in enumerate(zip(old, new)):
        if before != after:
            raise TokenizerError(
                f"{where}: id {token_id} would change from {before!r} to {after!r}; the base's ids must keep "
                "their meaning, so nothing was written (is the base's tokenizer_config.json adding tokens "
                "that tokenizer.json lacks?)"
            )
    for special in ("bos_id", "eos_id", "add_bos", "adds_eos"):
        if getattr(base, special) != getattr(extended, special):
            raise TokenizerError(
                f"{where}: {special} would change from {getattr(base, special)} to {getattr(extended, special)}; "
                "not written"
            )


def check_converted_folder(base: TokenizerSpec, staged: StagedExtension, extended: TokenizerSpec,
                           lines: Sequence[str]) -> dict:
    """A SentencePiece folder's tokenizer.json must encode as its tokenizer.model does wherever the base's did.

    Where the base's own tokenizer.json already cuts a line otherwise than its model, the extension cannot
    do better and is not blamed: transformers v5's Llama tokenizer, for one, adds the leading "▁" only when
    a text does not start with a space, which SentencePiece always adds. Those lines are counted in the
    report. A line the base's two files agree on and the extended ones do not is an error: nothing is
    written.
    """
    base_model = load_tokenizer(base.path / SP_MODEL_NAME).encoder()
    extended_model = load_tokenizer(staged.path / SP_MODEL_NAME).encoder()
    base_off = differing(base.encoder(), base_model, lines)
    extended_off = differing(extended.encoder(), extended_model, lines)
    new = [line for line, was, now in zip(lines, base_off, extended_off) if now and not was]
    if new:
        raise TokenizerError(
            f"{staged.path / 'tokenizer.json'}: the tokenizer.json transformers converted from the extended "
            f"tokenizer.model encodes {len(new)} of {len(lines)} held-out lines differently from the model where "
            f"the base's two files agree (first: {new[:1]}); nothing was written"
        )
    return {"lines": len(lines), "base_disagreeing": sum(base_off), "extended_disagreeing": sum(extended_off)}


def check_old_text(report: dict, where: Path) -> None:
    old = report["bytes_per_token"]["old_text"]
    if old["change"] < -MAX_OLD_TEXT_LOSS:
        raise TokenizerError(
            f"{where}: not written: old text would drop from {old['before']} to {old['after']} bytes per "
            f"token ({old['change']:+.1%}, more than the {MAX_OLD_TEXT_LOSS:.0%} allowed); "
            "pass a smaller --new-pieces"
        )


def stage_extension(base: TokenizerSpec, new_text: Path, new_pieces: int, scratch: Path, byte_fallback: bool = False,
                    old_lines: Sequence[str] | None = None) -> StagedExtension:
    """The extension that fits the base: SentencePiece (file or folder) or a BPE tokenizer.json.
    `old_lines`: the old sample whose encoding is kept (`--keep-old-encoding`)."""
    if base.kind == SENTENCEPIECE or SP_MODEL_NAME in base.files:
        return stage_sentencepiece(base, new_text, new_pieces, scratch, byte_fallback, old_lines)
    return stage_bpe(base, new_text, new_pieces, scratch, byte_fallback, old_lines)


def check_config(config: ExtendConfig) -> None:
    """Refuse flags that do not go together, before anything is read or written."""
    if not config.old_inputs:
        flag = "--keep-old-encoding needs" if config.keep_old_encoding else "give"
        raise TokenizerError(
            f"{flag} --old-input: text like the base's corpus, "
            + ("whose encoding is kept" if config.keep_old_encoding else "to measure what the extension does to old text")
            + "; nothing was written"
        )
    if config.keep_old_encoding and config.max_old_sample_bytes <= 0:
        raise TokenizerError(f"--max-old-sample-bytes {config.max_old_sample_bytes}: must be positive")


def summary_line(config: ExtendConfig, report: dict, seconds: float) -> str:
    """The one line `extend` ends with: sizes, what new and old text gain or lose, what stays unknown."""
    gains = report["bytes_per_token"]
    changed = report["old_text_changed_lines"]
    characters = report["unknown_characters"]
    kept = report["keep_old_encoding"]
    if characters["possible"]:
        unknown = (
            f"characters left <unk>: new {characters['new_text']['unknown_after']}/{characters['new_text']['characters']}, "
            f"old {characters['old_text']['unknown_after']}/{characters['old_text']['characters']} of the held-out "
            "text (no byte fallback: any character the donor did not see is <unk>; --byte-fallback adds it)"
        )
    else:
        added = "byte fallback added (256 byte pieces after the old ids)" if characters["byte_fallback_added"] else "byte fallback"
        unknown = f"no character can be <unk> ({added})"
    keeping = (f"; --keep-old-encoding: {kept['pieces_blocked']} pieces blocked, {kept['old_sample_lines']} old "
               f"sample lines keep their ids" if kept else "")
    return (
        f"extended {config.base} ({report['base']['vocab_size']}) -> {config.out} "
        f"({report['extended']['vocab_size']}): {report['pieces_added']} pieces added, "
        f"{report['added_pieces_used_on_new_text']} used on held-out new text; bytes/token new "
        f"{gains['new_text']['before']} -> {gains['new_text']['after']} ({gains['new_text']['change']:+.1%}), "
        f"old {gains['old_text']['before']} -> {gains['old_text']['after']} ({gains['old_text']['change']:+.1%}); "
        f"held-out old lines with other ids {changed['changed']}/{changed['lines']} ({changed['share']:.2%}){keeping}; "
        f"{unknown}; in {seconds:.1f} s; report {report['report_path']}"
    )


def extend_tokenizer(config: ExtendConfig) -> dict:
    """Run the extend command: returns the report it wrote (beside a .model, inside a folder)."""
    started = time.perf_counter()
    check_config(config)
    with tempfile.TemporaryDirectory(prefix="replaymix-extend-") as scratch_dir:
        scratch = Path(scratch_dir)
        report = _extend(config, scratch)
    print(summary_line(config, report, time.perf_counter() - started))
    return report


def _extend(config: ExtendConfig, scratch: Path) -> dict:
    """The command's work, in `scratch`: returns the report it wrote."""
    base = load_tokenizer(fetch(config.base, scratch))
    if base.kind == HUGGINGFACE and SP_MODEL_NAME not in base.files:
        bpe_model(json.loads((base.path / "tokenizer.json").read_text(encoding="utf-8")), base.path / "tokenizer.json")
    check_piece_count(config.new_pieces)
    as_folder = base.kind == HUGGINGFACE
    report_file = report_path(config.out, folder=as_folder)
    for output in (config.out, report_file):
        refuse_existing(output, config.overwrite)
    new_inputs, old_inputs = (select_inputs(inputs, config.split) for inputs in (config.inputs, config.old_inputs))
    check_split_used(config.split, new_inputs, old_inputs)
    print(f"{new_inputs.describe('--input')}\n{old_inputs.describe('--old-input')}", flush=True)
    # Old text is never trained on: its sample is the held-out slice alone, plus, with --keep-old-encoding,
    # the sample whose encoding is kept (outside the held-out slice, which measures what it missed).
    old_sample_bytes = config.max_old_sample_bytes if config.keep_old_encoding else 0
    new, old = (
        load_sample(selection, config.text_field, scratch / name, train_bytes, config.max_heldout_bytes,
                    config.holdout_fraction, config.address, config.num_cpus)
        for name, selection, train_bytes in (("new", new_inputs, config.max_sample_bytes),
                                             ("old", old_inputs, old_sample_bytes))
    )
    for name, sample in (("--input", new), ("--old-input", old)):
        if sample.heldout_lines == 0:
            raise TokenizerError(
                f"{name}: its held-out slice ({config.holdout_fraction:.0%} of documents by hash) is empty, "
                f"so bytes per token cannot be measured; give more documents ({sample.corpus_documents} now)"
            )
    print(new.summary())
    old_lines = None
    if config.keep_old_encoding:
        old_lines = read_lines(old.train_file)
        if not old_lines:
            raise TokenizerError("--keep-old-encoding: the old sample is empty (every --old-input document fell in the "
                                 "held-out slice); give more old text")
        print(f"old sample whose encoding is kept: {old.summary()}", flush=True)
    staged = stage_extension(base, new.train_file, config.new_pieces, scratch, config.byte_fallback, old_lines)
    new_heldout, old_heldout = read_lines(new.heldout_file), read_lines(old.heldout_file)
    # Measure before writing: a tokenizer that moves an old id or hurts old text must never reach `out`.
    extended = load_tokenizer(staged.path)
    check_extended(base, extended, len(staged.new_pieces), config.out)
    fast_vs_model = None
    if as_folder and SP_MODEL_NAME in base.files:
        fast_vs_model = check_converted_folder(base, staged, extended, new_heldout + old_heldout)
    report = build_report(base, extended, staged, new_heldout, old_heldout)
    if fast_vs_model is not None:
        # Held-out lines on which tokenizer.json and tokenizer.model disagree, in the base and the extension.
        report["tokenizer_json_vs_model"] = fast_vs_model
    check_old_text(report, config.out)
    report["base"]["path"], report["extended"]["path"] = str(config.base), str(config.out)
    report["sample"] = {
        "new_train_documents": new.train_documents,
        "new_train_bytes": new.train_bytes,
        "new_heldout_documents": new.heldout_documents,
        "old_heldout_documents": old.heldout_documents,
        "old_sample_documents": old.train_documents,
        "holdout_fraction": config.holdout_fraction,
    }
    refuse_existing(config.out, config.overwrite)
    if as_folder:
        write_report(staged.path / FOLDER_REPORT_NAME, report)
        write_output(staged.path, config.out)
    else:
        write_output(staged.path, config.out)
        staged_report = scratch / "report.json"
        write_report(staged_report, report)
        write_output(staged_report, report_file)
    report["report_path"] = str(report_file)
    return report
