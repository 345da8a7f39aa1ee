"""Hugging Face causal LMs in the trainer: load one (`--init-from hf:PATH`), grow its vocabulary to an
extended tokenizer, checkpoint and rebuild it, and give it back as a `save_pretrained` folder.

`HFCausalLM` wraps a `transformers` model so that the loop sees the interface of `trainer/lm.py`
(tokens -> logits or loss, optimizer groups, FLOPs per token); the loop never touches `transformers`.

The tokenizer travels with the run: the one the model is trained with (the extended one when an extension
report is given, else the model folder's) is checked against the embeddings when the run starts, copied
into the run's checkpoints/tokenizer/ at its first checkpoint, and written beside the weights by `save_hf`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.tokenizer.report import ExtensionReport, ExtensionReportError
from trainer.document_mask import DocumentMasking
from trainer.embedding_growth import grow_vocab
from trainer.errors import TrainerError
from trainer.lm import decay_groups, next_token_loss, training_flops_per_token

# model_type -> the families the trainer has been tested with: decoder-only, rotary or learned positions,
# one input embedding and one LM head. Others may well work; they are refused until tested.
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt_neox": "GPT-NeoX",
                         "mixtral": "Mixtral"}  # Mixtral: an upcycled model's export (trainer/growth.py) continues
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The files of a tokenizer folder that travel with the model (those present), the extension report included.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "extension_report.json")
HF_PREFIX = "hf:"


class HFModelError(TrainerError):
    """A Hugging Face model, its tokenizer or its extension report cannot be used as asked; the message
    names the folder or file and what to do."""


class HFCausalLM(nn.Module):
    """A `transformers` causal LM behind the trainer's model interface (`trainer/lm.py`)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        # --document-masking / --eod-mask-loss (trainer/document_mask.py), set by the loop: training and
        # evaluation alike see the row's documents kept apart. None: a row is causal over its whole length.
        self.documents: DocumentMasking | None = None

    @property
    def config(self) -> Any:
        """The model's `PretrainedConfig`; `config.vocab_size` is the embedding's rows."""
        return self.hf.config

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        # Never an attention mask: without document masking a packed window is causal over its whole length;
        # with it, positions restarting at each document are what makes transformers build the block mask.
        documents = self.documents
        position_ids = None if documents is None else documents.position_ids(tokens)
        logits = self.hf(input_ids=tokens, position_ids=position_ids, use_cache=False).logits
        if targets is None:
            return logits
        return next_token_loss(logits, targets if documents is None else documents.loss_targets(tokens, targets))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        return training_flops_per_token(self, self.hf.get_input_embeddings().weight,
                                        self.hf.get_output_embeddings().weight, c.num_hidden_layers,
                                        c.hidden_size, seq_len)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return decay_groups(self, weight_decay)

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild the architecture (`from_record`); weights go beside it."""
        generation = getattr(self.hf, "generation_config", None)
        return {"format": "huggingface", "config": self.hf.config.to_dict(),
                "generation_config": generation.to_dict() if generation is not None else None,
                "dtype": str(next(self.parameters()).dtype).removeprefix("torch.")}

    @property
    def tied(self) -> bool:
        return self.hf.get_input_embeddings().weight is self.hf.get_output_embeddings().weight


def is_hf_record(model_config: dict[str, Any]) -> bool:
    return model_config.get("format") == "huggingface"


def from_record(record: dict[str, Any]) -> HFCausalLM:
    """The architecture a checkpoint recorded, with fresh weights for the checkpoint's to be loaded into."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[record["config"]["model_type"]].from_dict(record["config"])
    hf = AutoModelForCausalLM.from_config(config, dtype=DTYPES[record["dtype"]], attn_implementation="sdpa")
    if record.get("generation_config") is not None:
        hf.generation_config = GenerationConfig.from_dict(record["generation_config"])
    return HFCausalLM(hf)


def hf_path(init_from: str) -> str:
    """`hf:PATH` -> PATH (a local folder, or a Hub id where a network exists)."""
    return init_from[len(HF_PREFIX):]


def _quiet_transformers() -> None:
    """No progress bars from transformers' loading and saving: the trainer's own output says what happens."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _check_causal_lm(where: str) -> Any:
    """The folder's config, refused (before any weight is read) unless it is a supported causal LM."""
    from transformers import AutoConfig

    local = Path(where).is_dir()
    if local and not (Path(where) / "config.json").is_file():
        raise HFModelError(f"{where}: no config.json, so not a Hugging Face model folder; pass the folder "
                           "`save_pretrained` wrote (--init-from hf:PATH)")
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local)
    except Exception as e:  # transformers raises OSError, ValueError, json errors, ...
        hint = ("check config.json" if local else
                "no such local folder, and the Hugging Face Hub could not give it (offline, or no such model id)")
        raise HFModelError(f"--init-from hf:{where}: cannot read the model's config ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from e
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    supported = ", ".join(f"{name} (model_type {t})" for t, name in SUPPORTED_MODEL_TYPES.items())
    saved_as = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    architectures = list(getattr(config, "architectures", None) or [])
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not causal_classes & set(architectures):
        if config.model_type in SUPPORTED_MODEL_TYPES:
            raise HFModelError(f"{where}: saved as {saved_as}, without the language-model head of "
                               f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]}, which would start "
                               "untrained; pass the folder of the causal LM")
        raise HFModelError(f"{where}: a {saved_as} (model_type {config.model_type!r}), which is not a causal "
                           f"language model; the trainer continues causal LMs of these families: {supported}")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise HFModelError(f"{where}: model_type {config.model_type!r} ({saved_as}) is not supported; the trainer "
                           f"supports {supported}")
    return config


def load_hf_model(where: str, dtype: str) -> HFCausalLM:
    """The pretrained model in `dtype`, with SDPA attention (flash or memory-efficient kernels on GPUs)."""
    from transformers import AutoModelForCausalLM

    _check_causal_lm(where)
    _quiet_transformers()
    try:
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], attn_implementation="sdpa",
                                                  local_files_only=Path(where).is_dir())
    except Exception as e:
        raise HFModelError(f"--init-from hf:{where}: transformers cannot load the weights ({type(e).__name__}: "
                           f"{e}); check the folder's safetensors / bin files") from e
    return HFCausalLM(hf)


def load_tokenizer(folder: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=Path(folder).is_dir())
    except Exception as e:
        raise HFModelError(f"{folder}: {what}: AutoTokenizer cannot load it ({type(e).__name__}: {e}); it must be "
                           "a tokenizer folder `save_pretrained` (or `pipeline.tokenizer extend`) wrote") from e


def check_vocabularies(model: HFCausalLM, base_tokenizer: Any, base_where: str,
                       report: ExtensionReport | None, extended_tokenizer: Any | None, report_path: Path | None) -> None:
    """Refuse, before any step, a tokenizer the embeddings cannot serve, or an extension report of another
    tokenizer than the model's. Rows may outnumber pieces (Qwen2 pads its embeddings); never the reverse."""
    rows = model.hf.get_input_embeddings().weight.shape[0]
    base = len(base_tokenizer)
    if report is None:
        if base > rows:
            raise HFModelError(
                f"{base_where}: the tokenizer has {base} pieces but the model's embeddings have {rows} rows; "
                "for a tokenizer extended by `pipeline.tokenizer extend`, pass its --extension-report "
                "(DIR/extension_report.json), or use the tokenizer the model was trained with")
        return
    if report.base_vocab_size != base:
        raise ExtensionReportError(
            f"{report_path}: an extension of a tokenizer of {report.base_vocab_size} pieces, but the model's "
            f"tokenizer ({base_where}) has {base}; pass the report `pipeline.tokenizer extend --base` wrote for "
            "this model's tokenizer")
    if report.base_vocab_size > rows:
        raise ExtensionReportError(
            f"{report_path}: base vocabulary {report.base_vocab_size} exceeds the model's {rows} embedding rows")
    if len(extended_tokenizer) != report.extended_vocab_size:
        raise ExtensionReportError(
            f"{report_path}: says the extended tokenizer has {report.extended_vocab_size} pieces, but the one in "
            f"{report_path.parent} has {len(extended_tokenizer)}; the report and the folder beside it disagree")
    # The same size is not the same tokenizer: every base id must mean the same piece in both.
    base_vocab, extended_vocab = base_tokenizer.get_vocab(), extended_tokenizer.get_vocab()
    differing = [piece for piece, i in base_vocab.items() if extended_vocab.get(piece) != i]
    if differing:
        raise ExtensionReportError(
            f"{report_path}: the extended tokenizer in {report_path.parent} is not an extension of the model's "
            f"tokenizer ({base_where}): {len(differing)} base pieces (e.g. {differing[0]!r}) have other ids; "
            "extend this model's tokenizer with `pipeline.tokenizer extend --base`")


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy the tokenizer files of `source` into `target` (created)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def check_save_dir(out: Path, overwrite: bool) -> None:
    """--save-hf DIR: refused before training when it holds anything (the export replaces the whole folder)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFModelError(f"--save-hf {out}: exists and is not empty; give an empty or new folder (or --overwrite "
                           "to replace it at the end of the run)")


def save_hf(state_dict: dict[str, torch.Tensor], model: HFCausalLM, tokenizer_dir: Path, out: Path) -> Path:
    """Write `out` as a complete Hugging Face folder: config, generation config, safetensors weights (the
    full `state_dict` of `model`'s wrapper, e.g. gathered from shards) and the tokenizer. Written beside
    and renamed into place, so `out` is never half a model."""
    _quiet_transformers()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    prefix = "hf."
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    model.hf.save_pretrained(staging, state_dict=weights)
    copy_tokenizer(tokenizer_dir, staging)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def resolve_folder(where: str) -> Path:
    """A local folder as it is; a Hub id downloaded (config, weights, tokenizer) where a network exists."""
    if Path(where).is_dir():
        return Path(where)
    _check_causal_lm(where)  # a clear error for a typo'd path, offline or not, before any download
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja"]))
    except Exception as e:
        raise HFModelError(f"--init-from hf:{where}: cannot download it from the Hub ({type(e).__name__}: {e})") from e


def prepare_vocabulary(model: HFCausalLM, base_dir: Path, report_path: Path | None) -> tuple[Path, int]:
    """Check the model's tokenizer (in `base_dir`) against its embeddings and, with an extension report,
    grow the embeddings to the extended tokenizer in the report's folder. Returns the folder of the
    tokenizer the run trains with, and its size."""
    base = load_tokenizer(base_dir, "the model's tokenizer")
    if report_path is None:
        check_vocabularies(model, base, str(base_dir), None, None, None)
        return base_dir, len(base)
    report = ExtensionReport.load(report_path)
    extended_dir = Path(report_path).parent
    if not any((extended_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ExtensionReportError(
            f"{report_path}: no tokenizer beside it in {extended_dir}; for a Hugging Face model pass the "
            "extension_report.json inside the folder `pipeline.tokenizer extend --base HF_FOLDER --out DIR` wrote")
    extended = load_tokenizer(extended_dir, f"the extended tokenizer beside {Path(report_path).name}")
    check_vocabularies(model, base, str(base_dir), report, extended, Path(report_path))
    grow_vocab(model, report)
    return extended_dir, len(extended)
