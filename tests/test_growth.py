"""Model growth (trainer/growth.py): block expansion and sparse upcycling of tiny random models built here,
whose logits must be the base's; grown runs of the trainer (--grow, --train): what trains, exact resume, and
a grown checkpoint refused without its growth."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    LlamaConfig,
    MixtralForCausalLM,
    Qwen2Config,
)

from tests.test_hf_model import base_tokenizer, datasets, extend_tokenizer, flags, make_model_folder  # noqa: F401
from tests.test_trainer import Crash, assert_bitwise_equal, checkpoint_of, crash_after, train_losses
from trainer.__main__ import main as trainer_main
from trainer.train import train
from trainer.train_config import parse_args, resume_command

from trainer.growth import GrowSpec, active_parameters, GrowthError, grow, grow_folder, inserted_layers, select_trainable
from trainer.hf_model import HFCausalLM

torch.set_num_threads(1)
VOCAB = 100
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny(family: str, layers: int = 4) -> HFCausalLM:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    config = {"llama": lambda: LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common),
              "qwen2": lambda: Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common),
              "gpt_neox": lambda: GPTNeoXConfig(tie_word_embeddings=False, **common)}[family]()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # biases and norms away from their 0/1 init, so a copy that forgot them would show
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return HFCausalLM(hf).eval()


def logits(model: HFCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_block_expansion_inserts_identity_blocks_and_keeps_the_logits(family):
    base = tiny(family)
    grown = grow(base, GrowSpec.parse("blocks:2"))
    assert grown.config.num_hidden_layers == 6
    record = grown.config.replaymix_growth
    assert record["new_layers"] == inserted_layers(4, 2) == [2, 5] and record["grow"] == "blocks:2"
    torch.testing.assert_close(logits(grown), logits(base), rtol=0, atol=1e-5)
    layers = grown.hf.gpt_neox.layers if family == "gpt_neox" else grown.hf.model.layers
    old = base.hf.gpt_neox.layers if family == "gpt_neox" else base.hf.model.layers
    # Each inserted block copies the one before it but for the two projections into the residual stream.
    for new_index, copied in ((2, 1), (5, 3)):
        for (name, p), (_, q) in zip(layers[new_index].named_parameters(), old[copied].named_parameters()):
            zeroed = any(z in name for z in ("o_proj", "down_proj", "attention.dense", "dense_4h_to_h"))
            assert torch.equal(p, torch.zeros_like(q) if zeroed else q), name
        assert layers[new_index].self_attn.layer_idx == new_index if family != "gpt_neox" else True
    # Training can move an inserted block off the identity: the zeroed projections get gradients.
    grown.train()(TOKENS[:, :-1], TOKENS[:, 1:]).backward()
    assert layers[2].mlp.down_proj.weight.grad.abs().sum() > 0 if family != "gpt_neox" else True


def test_upcycling_makes_a_mixtral_of_identical_experts_with_the_dense_models_logits(tmp_path):
    base = tiny("llama")
    for experts, top_k in ((4, 2), (3, 1), (4, 4)):
        moe = grow(base, GrowSpec.parse(f"experts:{experts},top_k:{top_k}"), seed=1)
        assert isinstance(moe.hf, MixtralForCausalLM) and moe.config.num_local_experts == experts
        assert moe.tied and moe.config.num_experts_per_tok == top_k
        assert moe.hf.model.layers[0].mlp.gate.weight.abs().sum() > 0  # a random router: it routes differently
        torch.testing.assert_close(logits(moe), logits(base), rtol=0, atol=1e-5)
        mlp = sum(p.numel() for layer in base.hf.model.layers for p in layer.mlp.parameters())
        assert active_parameters(moe) == base.num_params() + (top_k - 1) * mlp + 4 * experts * 32  # + routers
        # The compute a token spends: top_k copies of each MLP and the routers (6 FLOPs a weight in training).
        assert moe.flops_per_token(16) == base.flops_per_token(16) + 6 * ((top_k - 1) * mlp + 4 * experts * 32)
    # grow_folder: a folder on disk grown into one AutoModelForCausalLM loads, with the same logits.
    base.hf.save_pretrained(tmp_path / "dense")
    grow_folder(str(tmp_path / "dense"), GrowSpec.parse("experts:4,top_k:2"), str(tmp_path / "moe"), seed=1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert loaded.config.replaymix_growth["grow"] == "experts:4,top_k:2"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=TOKENS).logits, logits(base), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, grow_text, reason", [
    ("llama", "blocks:3", "the model has 4 layers, over which 3 new blocks cannot be spread evenly"),
    ("llama", "experts:64,top_k:2", "whose training state needs about"),
    ("gpt_neox", "experts:4,top_k:2", "upcycling makes a Mixtral"),
    ("llama", "experts:4,top_k:5", "1 <= top_k <= experts"),
    ("llama", "experts:1,top_k:1", "at least 2 experts"),
    ("llama", "blocks:0", "at least one block"),
    ("llama", "layers:2", "expected blocks:N"),
])
def test_growth_that_does_not_fit_the_model_or_the_memory_is_refused(family, grow_text, reason):
    base = tiny(family)
    with pytest.raises(GrowthError, match=reason.replace("(", r"\(")):
        grow(base, GrowSpec.parse(grow_text), available=2**20)  # 1 MiB: 64 experts of this model need 12


def test_new_blocks_mode_needs_blocks_and_freezes_the_rest():
    with pytest.raises(GrowthError, match="grown already"):
        grow(grow(tiny("llama"), GrowSpec.parse("blocks:1")), GrowSpec.parse("blocks:1"))
    with pytest.raises(GrowthError, match="give --grow blocks:N"):
        select_trainable(tiny("llama"), "new-blocks")
    grown = grow(tiny("llama"), GrowSpec.parse("blocks:2"), new_token_rows_from=90)
    select_trainable(grown, "new-blocks")
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in grown.named_parameters()
                         if ".layers.2." in n or ".layers.5." in n or "embed_tokens" in n}
    grown(TOKENS[:, :-1], TOKENS[:, 1:]).backward()
    grad = grown.hf.model.embed_tokens.weight.grad
    assert grad[:90].abs().sum() == 0


# ---- grown runs of the trainer ----------------------------------------------------------------------------

RUN = ["--steps", "4", "--checkpoint-every", "2", "--eval-every", "4", "--max-lr", "3e-3", "--weight-decay", "0.1"]


@pytest.fixture
def llama_folder(tmp_path, base_tokenizer) -> Path:
    return make_model_folder(tmp_path / "llama", "llama", base_tokenizer)


def snapshots(into: list) -> Callable:
    def hook(done: int, model, batch) -> None:
        into.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    return hook


def test_new_blocks_trains_only_the_inserted_blocks_and_new_token_rows(tmp_path, datasets, base_tokenizer,
                                                                       llama_folder):
    report = extend_tokenizer(base_tokenizer, tmp_path / "extended")
    states: list = []
    train(parse_args(flags(datasets, tmp_path / "run", "--init-from", f"hf:{llama_folder}", "--grow", "blocks:2",
                           "--train", "new-blocks", "--extension-report", str(report), *RUN)),
          on_step=snapshots(states))
    first, last = states[0], states[-1]
    rows = len(AutoTokenizer.from_pretrained(base_tokenizer))
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed == {k for k in first if ".layers.1." in k or ".layers.3." in k} | {"hf.model.embed_tokens.weight",
                                                                                      "hf.lm_head.weight"}
    embedding = "hf.model.embed_tokens.weight"
    assert torch.equal(first[embedding][:rows], last[embedding][:rows])  # old rows as they were
    assert not torch.equal(first[embedding][rows:], last[embedding][rows:])
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert saved.config.num_hidden_layers == 4 and saved.config.replaymix_growth["new_layers"] == [1, 3]


@pytest.mark.parametrize("grow_text, train_flags", [("blocks:1", ["--train", "new-blocks"]),
                                                   ("experts:4,top_k:2", [])])
def test_a_grown_run_resumes_bit_for_bit_and_not_without_its_growth(tmp_path, datasets, llama_folder, grow_text,
                                                                     train_flags, capsys):
    common = ["--init-from", f"hf:{llama_folder}", "--grow", grow_text, *train_flags, *RUN]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_args(flags(datasets, straight, *common)))
    with pytest.raises(Crash):
        train(parse_args(flags(datasets, stopped, *common)), on_step=crash_after(3))
    resume = [*resume_command(flags(datasets, stopped, *common))]
    without_growth = [a for a in resume if a not in ("--grow", grow_text, *train_flags)]
    assert trainer_main(without_growth) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--grow: checkpoint" in err
    train(parse_args(resume))
    assert train_losses(stopped) == train_losses(straight)
    for name in ("model", "optimizer"):
        assert_bitwise_equal(checkpoint_of(stopped)[name], checkpoint_of(straight)[name], name)
    record = checkpoint_of(straight)["model_config"]["config"]["replaymix_growth"]
    assert record["grow"] == grow_text
    exported = AutoModelForCausalLM.from_pretrained(straight / "hf")
    assert type(exported).__name__ == ("MixtralForCausalLM" if "experts" in grow_text else "LlamaForCausalLM")
    if "experts" in grow_text:  # an upcycled model's export is a model a later update continues
        train(parse_args(flags(datasets, tmp_path / "continued", "--init-from", f"hf:{straight / 'hf'}", *RUN)))
        assert train_losses(tmp_path / "continued")


def test_grow_and_train_flags_are_checked(tmp_path, datasets, llama_folder, capsys):
    for extra, reason in ((["--train", "new-blocks"], "--train new-blocks needs --grow blocks:N"),
                          (["--grow", "blocks:2"], "--grow grows the model a run continues"),
                          (["--grow", "blocks:x"], "expected blocks:N")):
        with pytest.raises(SystemExit) as refused:
            parse_args(flags(datasets, tmp_path / "r", *extra))
        assert refused.value.code == 2 and reason in capsys.readouterr().err
    status = trainer_main(flags(datasets, tmp_path / "r3", "--init-from", f"hf:{llama_folder}", "--grow", "blocks:3"))
    assert status == 2 and "cannot be spread evenly" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()  # nothing written
