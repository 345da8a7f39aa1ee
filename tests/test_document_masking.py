"""--document-masking and --eod-mask-loss (trainer/document_mask.py): a document inside a packed row computes
what it computes alone, a row of one document is unchanged, a run with the flags resumes to the bit, and
an attention implementation that cannot keep documents apart is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.__main__ import main
from trainer.document_mask import DocumentMasking, document_positions
from trainer.hf_model import HFCausalLM
from trainer.metrics_log import read_metrics
from trainer.train import train
from trainer.train_config import parse_args

torch.set_num_threads(1)
EOS = 2


def tiny_llama(attention: str) -> HFCausalLM:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return HFCausalLM(AutoModelForCausalLM.from_config(config, attn_implementation=attention)).eval()


def test_positions_restart_after_each_eos():
    row = torch.tensor([[7, 8, EOS, 9, EOS, EOS, 10, 11]])
    assert document_positions(row, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_document_in_a_packed_row_computes_what_it_computes_alone(attention):
    model = tiny_llama(attention)
    documents = [[1, 5, 6, 7, EOS], [1, 8, 9, 10, 11, 12, EOS], [1, 13, 14]]  # the last one cut by the window
    row = torch.tensor([sum(documents, [])] * 2)  # two rows: the mask is built per row of a batch
    with torch.no_grad():
        model.documents = DocumentMasking(EOS)
        packed = model(row)
        model.documents = None
        start = 0
        for document in documents:
            alone = model(torch.tensor([document]))
            inside = packed[:, start:start + len(document)]
            assert (inside - alone).abs().max().item() < 1e-5
            start += len(document)
        # Without the flag the second document sees the first: the test can tell the two apart.
        causal = model(row)
        assert (causal[:, 5:12] - packed[:, 5:12]).abs().max().item() > 1e-3


def test_a_row_of_one_document_is_unchanged_by_the_flag():
    model = tiny_llama("sdpa")
    row = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])  # no EOS: one document over the whole window
    with torch.no_grad():
        plain = model(row)
        model.documents = DocumentMasking(EOS)
        assert torch.equal(model(row), plain)


def test_eod_mask_loss_leaves_out_the_prediction_made_at_an_eos():
    model = tiny_llama("sdpa")
    row = torch.tensor([[1, 5, 6, EOS, 1, 8, 9, EOS, 1, 10, 11]])
    tokens, targets = row[:, :-1], row[:, 1:]
    with torch.no_grad():
        model.documents = DocumentMasking(EOS, keep_apart=False, mask_boundary_loss=True)
        loss = model(tokens, targets)
        logits = model(tokens)[0]
    kept = tokens[0] != EOS
    assert torch.allclose(loss, F.cross_entropy(logits[kept], targets[0][kept]))


DOCUMENT_FLAGS = ("--document-masking", "--eod-mask-loss")


def run_args(dataset, out, *extra, flags=DOCUMENT_FLAGS):
    return [f"--dataset=en={dataset}", "--model", "test", "--seq-len", "32", "--global-batch", "4",
            "--micro-batch", "2", "--eval-every", "2", "--eval-batches", "1", "--no-progress", *flags,
            "--out", str(out), *extra]


def test_a_run_with_document_masking_resumes_to_the_bit(tmp_path, token_dataset_factory, english_model,
                                                        english_lines, capsys):
    english = token_dataset_factory("en", english_lines[:300], english_model, english_lines[1900:])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--steps", "4", "--checkpoint-every", "2")
    assert main(run_args(english.root, straight, *common)) == 0

    def crash_after_step_3(step, model, batch):
        if step == 3:
            raise KeyboardInterrupt("crashed")  # past the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(parse_args(run_args(english.root, resumed, *common)), on_step=crash_after_step_3)
    assert main(run_args(english.root, resumed, *common, "--resume")) == 0
    records = read_metrics(straight)
    losses = lambda run: {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    evals = lambda run: [r["val_loss"] for r in read_metrics(run) if r["kind"] == "eval"]
    assert evals(resumed) == evals(straight)
    assert all(r["document_masking"] and r["eod_mask_loss"] for r in records)
    # What the flags define is the run: a resume without them is refused.
    assert main(run_args(english.root, resumed, *common, "--resume", flags=())) == 2
    assert "--document-masking: checkpoint True, given False" in capsys.readouterr().err


def test_an_attention_that_cannot_keep_documents_apart_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(run_args(tmp_path / "data", tmp_path / "run", "--attention", "flash_attention_2"))
    assert refused.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--document-masking: attention 'flash_attention_2'" in errors[0]
    assert "use --attention sdpa or eager or flex_attention" in errors[0]
    assert not (tmp_path / "run").exists()
