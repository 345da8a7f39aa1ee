"""The fresh model (a transformers Llama of a named size), vocabulary growth and checkpoints, on the tiny
"test" size."""

import json

import pytest
import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.hf_model import HFCausalLM, from_record
from trainer.model import fresh_model
from pipeline.tokenizer.report import ExtensionReport, ExtensionReportError
from trainer.embedding_growth import grow_vocab, pad_optimizer_state


# One intra-op thread: the models are tiny, and on a shared 2-core machine a second spinning
# OpenMP thread costs far more than it gives.
torch.set_num_threads(1)

def small_model(vocab: int = 64, tied: bool = True, seed: int = 0) -> HFCausalLM:
    torch.manual_seed(seed)
    return fresh_model("test", vocab, max_seq_len=32, tie_embeddings=tied)


def embedding(model: HFCausalLM) -> torch.Tensor:
    return model.hf.get_input_embeddings().weight


def head(model: HFCausalLM) -> torch.Tensor:
    return model.hf.get_output_embeddings().weight


def test_named_sizes_have_the_advertised_scale():
    def millions(size, vocab):
        with torch.device("meta"):
            return fresh_model(size, vocab, 64).num_params() / 1e6

    assert 0.5 < millions("test", 512) < 1.5
    assert 2 < millions("tiny", 4096) < 8
    assert 100 < millions("125m", 32000) < 140


def test_a_fresh_model_is_a_plain_llama():
    model = small_model(tied=False)
    assert type(model.hf).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 64
    assert model.config.bos_token_id is None and not model.tied
    assert small_model().tied


def test_logits_are_causal():
    model = small_model().eval()
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 64)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_model_overfits_a_fixed_batch():
    model = small_model()
    tokens = torch.randint(0, 64, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 4.0 and loss.item() < first / 3


def write_report(path, base, extended, pieces):
    path.write_text(json.dumps({
        "base": {"vocab_size": base},
        "extended": {"vocab_size": extended},
        "new_pieces": [{"id": i, "piece": f"p{i}", "base_ids": ids} for i, ids in pieces.items()],
    }))
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_growth_keeps_old_rows_and_sets_new_rows_to_means(tmp_path, tied):
    model = small_model(tied=tied)
    old_embed, old_head = embedding(model).detach().clone(), head(model).detach().clone()
    report = ExtensionReport.load(write_report(tmp_path / "r.json", 64, 67, {64: [3, 5], 65: [7], 66: [7, 7, 2]}))
    grow_vocab(model, report)
    assert model.config.vocab_size == 67 and embedding(model).shape == (67, 128)
    for weight, old in ((embedding(model), old_embed), (head(model), old_head)):
        torch.testing.assert_close(weight[:64], old)
        torch.testing.assert_close(weight[64], old[[3, 5]].mean(0))
        torch.testing.assert_close(weight[65], old[7])
        torch.testing.assert_close(weight[66], old[[7, 7, 2]].mean(0))  # a repeated id counts each time
    assert (head(model) is embedding(model)) == tied
    assert model(torch.tensor([[64, 65, 66]])).shape == (1, 3, 67)


def test_growth_pads_the_optimizer_state_with_zero_moments(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    state = optimizer.state_dict()
    grow_vocab(model, ExtensionReport.load(write_report(tmp_path / "r.json", 64, 66, {64: [1], 65: [2]})))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(state)
    pad_optimizer_state(optimizer)
    moments = optimizer.state[embedding(model)]["exp_avg"]
    assert moments.shape == (66, 128) and moments[64:].abs().sum() == 0 and moments[:64].abs().sum() > 0
    model(torch.tensor([[64, 65]]), torch.tensor([[65, 64]])).backward()
    optimizer.step()  # would raise on a shape mismatch


def test_bad_extension_reports_are_named(tmp_path):
    with pytest.raises(ExtensionReportError, match="missing \\[65\\]"):
        ExtensionReport.load(write_report(tmp_path / "a.json", 64, 66, {64: [1]}))
    with pytest.raises(ExtensionReportError, match="outside the base vocabulary"):
        ExtensionReport.load(write_report(tmp_path / "b.json", 64, 65, {64: [70]}))
    # `extend` always cuts a piece into at least one base id: an empty list is a damaged report.
    with pytest.raises(ExtensionReportError, match="id 65 .*base_ids is empty"):
        ExtensionReport.load(write_report(tmp_path / "e.json", 64, 66, {64: [1], 65: []}))


def test_checkpoint_round_trip(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path / "c.pt", model, optimizer, step=7, first_eval={"en": 4.0}, run_config={"x": 1})
    payload = load_checkpoint(tmp_path / "c.pt")
    restored = from_record(payload["model_config"])
    restored.load_state_dict(payload["model"])
    assert payload["step"] == 7 and payload["first_eval"] == {"en": 4.0}
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b)
    assert head(restored) is embedding(restored)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
