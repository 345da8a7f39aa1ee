"""Continuing Hugging Face causal LMs: tiny random Llama, Qwen2 and GPT-NeoX models built here from their
configs and saved with `save_pretrained`, a byte-level BPE tokenizer trained here, real token datasets.
Nothing is downloaded and nothing of ours is mocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig, Qwen2Config

from pipeline.tokenizer.report import ExtensionReport
from tests.conftest import base_tokenizer, write_token_dataset  # noqa: F401  (a fixture others import from here)
from tests.hf_tokenizers import train_tokenizer
from tests.test_trainer import Crash, assert_bitwise_equal, checkpoint_of, crash_after, evals, train_losses
from trainer.embedding_growth import grow_vocab
from trainer.hf_model import HFCausalLM, from_record
from trainer.metrics_log import read_metrics
from trainer.train import train
from trainer.train_config import parse_args

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

SMALL = ["--micro-batch", "4", "--eval-batches", "2", "--no-progress", "--seq-len", "32", "--global-batch", "8"]
# What the tokenizer's extension adds: German words, whole, as the extended tokenizer's new pieces.
NEW_PIECES = ["handbuchseite", "beschreibt", "eingabedatei", "standardausgabe"]


def tiny_config(family: str, vocab: int):
    """2 layers, hidden 64: the family's own config class, so its own modelling code runs."""
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":  # untied, with padding rows beyond the tokenizer, as the real Qwen2 models have
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **{**common, "vocab_size": vocab + 12})
    return GPTNeoXConfig(tie_word_embeddings=False, **common)


def make_model_folder(folder: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def extend_tokenizer(base_dir: Path, out: Path, pieces=NEW_PIECES) -> Path:
    """The folder `pipeline.tokenizer extend --base` writes: the base tokenizer with new pieces appended, and
    extension_report.json giving each new id its segmentation under the base."""
    base = AutoTokenizer.from_pretrained(base_dir)
    extended = AutoTokenizer.from_pretrained(base_dir)
    extended.add_tokens(list(pieces))
    extended.save_pretrained(out)
    report = {
        "base": {"vocab_size": len(base)},
        "extended": {"vocab_size": len(extended)},
        "new_pieces": [{"id": extended.convert_tokens_to_ids(p), "piece": p,
                        "base_ids": base(p, add_special_tokens=False)["input_ids"]} for p in pieces],
    }
    (out / "extension_report.json").write_text(json.dumps(report))
    return out / "extension_report.json"


@pytest.fixture
def datasets(tmp_path, base_tokenizer, english_lines, german_lines) -> dict[str, Path]:
    english = write_token_dataset(tmp_path / "en", english_lines[:300], base_tokenizer, english_lines[1900:])
    german = write_token_dataset(tmp_path / "de", german_lines[:300], base_tokenizer, german_lines[1900:])
    return {"en": english.root, "de": german.root}


def flags(datasets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"--dataset={name}={path}" for name, path in datasets.items()] + SMALL + ["--out", str(out), *extra]


def trained_model(run_dir: Path, name: str = "final.pt") -> HFCausalLM:
    payload = checkpoint_of(run_dir, name)
    model = from_record(payload["model_config"])
    model.load_state_dict(payload["model"])
    return model.eval()


def assert_folder_reproduces(folder: Path, model: HFCausalLM, tokens: torch.Tensor) -> None:
    """The exported folder loads with the Auto classes and gives the trainer's model's logits."""
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).eval()
    assert AutoTokenizer.from_pretrained(folder) is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_a_family_trains_resumes_exactly_and_comes_back_as_a_hugging_face_folder(tmp_path, datasets, base_tokenizer,
                                                                                 family):
    source = make_model_folder(tmp_path / family, family, base_tokenizer)
    common = ["--init-from", f"hf:{source}", "--steps", "6", "--checkpoint-every", "2", "--eval-every", "3",
              "--weights", "en=3,de=1", "--lr-schedule", "wsd", "--max-lr", "3e-3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_args(flags(datasets, straight, *common)))
    with pytest.raises(Crash):
        train(parse_args(flags(datasets, stopped, *common)), on_step=crash_after(5))
    resumed = [a for a in flags(datasets, stopped, *common) if a not in ("--init-from", f"hf:{source}")]
    train(parse_args([*resumed, "--resume"]))

    assert sorted(train_losses(straight)) == list(range(1, 7))
    assert train_losses(stopped) == train_losses(straight)  # bit for bit
    assert evals(stopped) == evals(straight) and [e["step"] for e in evals(straight)] == [0, 3, 6]
    assert set(evals(straight)[-1]["forgetting"]) == {"en", "de"}
    assert evals(straight)[-1]["val_loss"]["en"] < evals(straight)[0]["val_loss"]["en"]
    for name in ("model", "optimizer"):
        assert_bitwise_equal(checkpoint_of(stopped)[name], checkpoint_of(straight)[name], name)

    model = trained_model(straight)
    assert type(model.hf).__name__ == type(AutoModelForCausalLM.from_pretrained(source)).__name__
    tokens = torch.randint(0, 300, (2, 24))
    assert_folder_reproduces(straight / "hf", model, tokens)
    assert_folder_reproduces(stopped / "hf", model, tokens)  # the resumed run exports the same model
    assert (straight / "hf" / "tokenizer.json").read_bytes() == (base_tokenizer / "tokenizer.json").read_bytes()


def test_the_stream_trains_a_hugging_face_model_like_the_in_process_mixer(tmp_path, datasets, base_tokenizer):
    from tests.test_service import ServiceProcess, free_port, service_args

    source = make_model_folder(tmp_path / "llama", "llama", base_tokenizer)
    service = ServiceProcess(service_args(datasets, tmp_path / "state", None, "en=0.75,de=0.25",
                                          seq_len=32, global_batch=8), free_port()).start()
    common = ["--init-from", f"hf:{source}", "--steps", "3", "--eval-every", "3", "--max-lr", "2e-3",
              "--micro-batch", "4", "--eval-batches", "2", "--no-progress"]
    try:
        train(parse_args(common + ["--stream", service.url, "--stream-token-file", str(tmp_path / "state.read-token"),
                                   "--out", str(tmp_path / "stream")]))
    finally:
        service.stop()
    train(parse_args(flags(datasets, tmp_path / "local", *common, "--weights", "en=0.75,de=0.25", "--data-seed", "5")))
    assert train_losses(tmp_path / "stream") == train_losses(tmp_path / "local")
    assert evals(tmp_path / "stream") == evals(tmp_path / "local")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_growth_keeps_old_rows_and_the_logits_of_old_text(tmp_path, base_tokenizer, english_lines, family):
    source = make_model_folder(tmp_path / family, family, base_tokenizer)
    report = ExtensionReport.load(extend_tokenizer(base_tokenizer, tmp_path / "extended"))
    model = HFCausalLM(AutoModelForCausalLM.from_pretrained(source)).eval()
    rows = model.config.vocab_size
    old_in = model.hf.get_input_embeddings().weight.detach().clone()
    old_out = model.hf.get_output_embeddings().weight.detach().clone()
    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer)
    old_text = torch.tensor([tokenizer(english_lines[0] + " " + english_lines[1])["input_ids"][:40]])
    with torch.no_grad():
        before = model(old_text)

    grow_vocab(model, report)
    expected_rows = max(rows, report.extended_vocab_size)  # Qwen2's padding rows take the new ids
    assert model.config.vocab_size == expected_rows == model.hf.get_output_embeddings().weight.shape[0]
    assert model.tied == (family == "llama")
    for weight, old in ((model.hf.get_input_embeddings().weight, old_in),
                        (model.hf.get_output_embeddings().weight, old_out)):
        assert weight.shape[0] == expected_rows
        torch.testing.assert_close(weight[:report.base_vocab_size], old[:report.base_vocab_size], rtol=0, atol=0)
        for piece in report.new_pieces:
            torch.testing.assert_close(weight[piece.id], old[list(piece.base_ids)].mean(0))
    with torch.no_grad():
        after = model(old_text)
    # Old text reads the same: every base piece's logit unchanged, and so its loss over the base vocabulary.
    base = report.base_vocab_size
    assert (after[..., :base] - before[..., :base]).abs().max() < 1e-5
    targets = old_text[:, 1:]
    loss_before = torch.nn.functional.cross_entropy(before[0, :-1, :base], targets[0])
    loss_after = torch.nn.functional.cross_entropy(after[0, :-1, :base], targets[0])
    assert abs(loss_after.item() - loss_before.item()) < 1e-5


def test_a_run_on_an_extended_tokenizer_grows_trains_and_exports_it(tmp_path, base_tokenizer, german_lines,
                                                                    english_lines):
    """End to end with the real extension: `pipeline.tokenizer extend` on the model's byte-level BPE folder,
    datasets tokenized with the extended folder, the model grown, trained in bf16 and exported."""
    from pipeline.ray_runtime import init_ray
    from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer as extend_for_real

    source = make_model_folder(tmp_path / "llama", "llama", base_tokenizer)
    corpora = {}
    for name, lines in (("de", german_lines[:1800]), ("en", english_lines[:1800])):
        corpora[name] = tmp_path / f"{name}.jsonl"
        corpora[name].write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    init_ray(num_cpus=1)
    extended = tmp_path / "extended"
    written = extend_for_real(ExtendConfig(base=base_tokenizer, inputs=(str(corpora["de"]),),
                                           old_inputs=(str(corpora["en"]),), new_pieces=24, out=extended))
    added = written["pieces_added"]
    report = extended / "extension_report.json"
    german = write_token_dataset(tmp_path / "de", german_lines[:300], extended, german_lines[1900:])
    english = write_token_dataset(tmp_path / "en", english_lines[:300], extended, english_lines[1900:])
    assert max(int(doc.max()) for doc in german.train.documents()) >= 300  # the new pieces are in use
    out = tmp_path / "run"
    train(parse_args(flags({"de": german.root, "en": english.root}, out, "--init-from", f"hf:{source}",
                           "--extension-report", str(report), "--steps", "3", "--eval-every", "3",
                           "--dtype", "bfloat16")))
    exported = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert exported.config.vocab_size == 300 + added and exported.dtype == torch.bfloat16
    assert exported.get_input_embeddings().weight is exported.get_output_embeddings().weight
    assert len(AutoTokenizer.from_pretrained(out / "hf")) == 300 + added
    assert (out / "hf" / "extension_report.json").is_file()
    assert_folder_reproduces(out / "hf", trained_model(out), torch.randint(0, 300 + added, (2, 16)))


def test_a_checkpoint_of_a_hugging_face_run_continues_without_rewarming(tmp_path, datasets, base_tokenizer):
    source = make_model_folder(tmp_path / "neox", "gpt_neox", base_tokenizer)
    first = tmp_path / "phase1"
    train(parse_args(flags(datasets, first, "--init-from", f"hf:{source}", "--steps", "6", "--eval-every", "6",
                           "--lr-schedule", "infinite", "--max-lr", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "1",
                           "--cooldown-steps", "2", "--decay-steps", "1", "--save-at", "3")))
    recorded_lr = {r["step"]: r["lr"] for r in read_metrics(first) if r["kind"] == "train"}
    second = tmp_path / "phase2"
    train(parse_args(flags(datasets, second, "--init-from", str(first / "checkpoints" / "step-000003.pt"),
                           "--continue-schedule", "--reset-optimizer", "--steps", "4", "--eval-every", "4",
                           "--decay-steps", "2", "--save-hf", str(tmp_path / "exported"))))
    lrs = [r["lr"] for r in read_metrics(second) if r["kind"] == "train"]
    assert lrs[0] == recorded_lr[4] and lrs[1] == lrs[0] and lrs[-1] < lrs[0]  # no re-warming: held, then annealed
    assert_folder_reproduces(tmp_path / "exported", trained_model(second), torch.randint(0, 300, (1, 16)))


def trainer_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def exit_status_and_stderr(args: list[str], capsys, own_process: bool) -> tuple[int, str]:
    """What `python -m trainer ARGS` gives the shell: run for real, or through the function it runs
    (`trainer.__main__.main`) in this process, which skips the ~4 s of importing torch and transformers."""
    if own_process:
        result = trainer_process(*args)
        return result.returncode, result.stderr
    from trainer.__main__ import main

    status = main(args)
    return status, capsys.readouterr().err


def test_bad_models_tokenizers_reports_and_dtypes_are_refused_before_training(tmp_path, datasets, base_tokenizer,
                                                                              german_lines, english_lines, capsys):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaModel

    good = make_model_folder(tmp_path / "llama", "llama", base_tokenizer)
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(bert)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=4)).save_pretrained(gpt2)
    headless = tmp_path / "headless"
    LlamaModel(tiny_config("llama", 300)).save_pretrained(headless)
    small = tmp_path / "small-vocab"  # embeddings of 200 rows, tokenizer of 300 pieces
    AutoModelForCausalLM.from_config(tiny_config("llama", 200)).save_pretrained(small)
    AutoTokenizer.from_pretrained(base_tokenizer).save_pretrained(small)
    # Another base: of another size, or of the same size with other pieces (trained on other text).
    other_base = extend_tokenizer(train_tokenizer(english_lines[:800], 290, tmp_path / "290"), tmp_path / "other-base")
    other_dir = train_tokenizer(german_lines[:800] + english_lines[:100], 300, tmp_path / "other-tokenizer")
    other_pieces = extend_tokenizer(other_dir, tmp_path / "other-pieces")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")

    cases = {
        "not a causal LM": (["--init-from", f"hf:{bert}"], "not a causal language model"),
        "unsupported": (["--init-from", f"hf:{gpt2}"], "model_type 'gpt2' (GPT2LMHeadModel) is not supported; the "
                        "trainer supports Llama (model_type llama), Mistral"),
        "no head": (["--init-from", f"hf:{headless}"], "without the language-model head"),
        "no folder": (["--init-from", f"hf:{tmp_path / 'nowhere'}"], "cannot read the model's config"),
        "tokenizer too big": (["--init-from", f"hf:{small}"], "has 300 pieces but the model's embeddings have 200 rows"),
        "report of another size": (["--init-from", f"hf:{good}", "--extension-report", str(other_base)],
                                   "an extension of a tokenizer of 290 pieces"),
        "report of another tokenizer": (["--init-from", f"hf:{good}", "--extension-report", str(other_pieces)],
                                        "is not an extension of the model's tokenizer"),
        "float16": (["--init-from", f"hf:{good}", "--dtype", "float16"], "--dtype float16"),
        "save-hf not empty": (["--init-from", f"hf:{good}", "--save-hf", str(kept)], "exists and is not empty"),
    }
    capsys.readouterr()
    for name, (extra, message) in cases.items():
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        # One case as the user runs it, a process of its own: the exit status and stderr the shell sees.
        status, stderr = exit_status_and_stderr(flags(datasets, out, "--steps", "2", *extra), capsys,
                                                own_process=name == "unsupported")
        assert status == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr, name
        error = stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error, (name, error)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists(), name
    assert [p.name for p in kept.iterdir()] == ["mine.txt"]
