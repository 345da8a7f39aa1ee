"""Model growth (trainer/growth.py): block expansion and sparse upcycling of tiny random models built here,
whose logits must be the base's; what --train new-blocks trains."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, MixtralForCausalLM, Qwen2Config

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
