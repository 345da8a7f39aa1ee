"""Model merging (trainer/merge.py): TIES against values worked out by hand, and real Hugging Face folders of
tiny random Llamas (and one Qwen2) built here, merged, and loaded back with the Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from tests.hf_tokenizers import wordlevel_folder
from trainer.merge import (
    MergeError,
    MergeSpec,
    disjoint_mean,
    elect_sign,
    linear,
    main,
    merge_folders,
    merge_state_dicts,
    task_arithmetic,
    ties,
    trim,
)

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
WORDS = [f"w{i}" for i in range(60)]
NEW_WORDS = [f"neu{i}" for i in range(8)]  # an extension: ids after the base's

# Three task vectors of five entries, base [1, 2, 3, 4, 5]. Worked out by hand for density 0.6 (k = 3 kept):
#   trimmed  t1 = [ 0.8,  0,   0,   0.9, -0.4]    (0.9, 0.8, -0.4 are its largest; -0.2, 0.1 go)
#            t2 = [-0.3,  0.6, 0,   0,   -0.8]
#            t3 = [-0.4,  0,   0.7, 0.3,  0  ]
#   mass     sum = [0.1, 0.6, 0.7, 1.2, -1.2] -> signs [+, +, +, +, -]. Entry 0 goes by mass: two models
#            pull down, but less than the one pulling up (a vote by count would elect -).
#   disjoint mean over the agreeing entries: [0.8, 0.6, 0.7, (0.9 + 0.3) / 2, (-0.4 - 0.8) / 2]
#                                          = [0.8, 0.6, 0.7, 0.6, -0.6]
BASE = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
TASK_VECTORS = [torch.tensor([0.8, -0.2, 0.1, 0.9, -0.4]),
                torch.tensor([-0.3, 0.6, -0.05, 0.2, -0.8]),
                torch.tensor([-0.4, -0.1, 0.7, 0.3, 0.05])]
MODELS = [BASE + t for t in TASK_VECTORS]


def test_ties_trims_elects_by_mass_and_takes_the_disjoint_mean_as_worked_out_by_hand():
    trimmed = torch.stack([trim(t, 0.6) for t in TASK_VECTORS])
    torch.testing.assert_close(trimmed, torch.tensor([[0.8, 0, 0, 0.9, -0.4], [-0.3, 0.6, 0, 0, -0.8],
                                                      [-0.4, 0, 0.7, 0.3, 0]]))
    sign = elect_sign(trimmed)
    assert sign.tolist() == [1, 1, 1, 1, -1]
    torch.testing.assert_close(disjoint_mean(trimmed, torch.ones(3), sign), torch.tensor([0.8, 0.6, 0.7, 0.6, -0.6]))
    torch.testing.assert_close(ties(BASE, MODELS, [1, 1, 1], density=0.6, lam=1.0),
                               torch.tensor([1.8, 2.6, 3.7, 4.6, 4.4]))
    torch.testing.assert_close(ties(BASE, MODELS, [1, 1, 1], density=0.6, lam=0.5),
                               torch.tensor([1.4, 2.3, 3.35, 4.3, 4.7]))
    # Weights count in the mass: t2 twice makes entry 0's sum 0.8 - 0.6 - 0.4 < 0, so - wins, and the mean
    # of the agreeing entries is weighted: (2 x -0.3 + 1 x -0.4) / 3.
    weighted = ties(BASE, MODELS, [1, 2, 1], density=0.6, lam=1.0)
    assert weighted[0].item() == pytest.approx(1.0 - 1.0 / 3)
    # Density 0.2 keeps one entry each (0.9, -0.8, 0.7): entries 0 and 1 keep nothing, so stay at the base.
    torch.testing.assert_close(ties(BASE, MODELS, [1, 1, 1], density=0.2, lam=1.0),
                               torch.tensor([1.0, 2.0, 3.7, 4.9, 4.2]))
    # Density 1 trims nothing: entry 2 keeps t1's 0.1 and t3's 0.7 (t2's -0.05 disagrees).
    assert ties(BASE, MODELS, [1, 1, 1], density=1.0, lam=1.0)[2].item() == pytest.approx(3.4)


def test_task_arithmetic_and_linear_follow_their_definitions():
    torch.testing.assert_close(task_arithmetic(BASE, MODELS, [1, 1, 1], lam=0.5),
                               BASE + 0.5 * sum(TASK_VECTORS))
    torch.testing.assert_close(linear(MODELS[:2], [1, 3]), (MODELS[0] + 3 * MODELS[1]) / 4)
    # DARE keeps each entry with probability density, scaled by 1/density: the mean task vector stays.
    big = torch.full((200_000,), 0.5)
    dropped = task_arithmetic(torch.zeros_like(big), [big], [1], lam=1.0, density=0.25,
                              generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0.0, 2.0}
    assert dropped.mean().item() == pytest.approx(0.5, rel=0.02)


# ---- folders ----------------------------------------------------------------------------------------------


def llama(vocab: int, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def save_model(folder: Path, config, tokenizer: Path, seed: int = 0, like: Path | None = None,
               noise: float = 0.0) -> Path:
    """A model of `config`: random, or `like`'s weights (its rows first) plus seeded noise, a continued run's
    stand-in; saved with its tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if like is not None:
        source = AutoModelForCausalLM.from_pretrained(like).state_dict()
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p[: source[name].shape[0]] = source[name] + noise * torch.randn_like(source[name])
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base_tok = wordlevel_folder(WORDS, root / "tok-base")
    ext_tok = wordlevel_folder(WORDS + NEW_WORDS, root / "tok-ext")
    n, m = len(AutoTokenizer.from_pretrained(base_tok)), len(AutoTokenizer.from_pretrained(ext_tok))
    base = save_model(root / "base", llama(n), base_tok)
    return {
        "base": base,
        "a": save_model(root / "a", llama(n), base_tok, seed=1, like=base, noise=0.05),
        "b": save_model(root / "b", llama(m), ext_tok, seed=2, like=base, noise=0.05),  # grown vocabulary
        "wide": save_model(root / "wide", llama(n, hidden=48), base_tok),
        "qwen": save_model(root / "qwen", Qwen2Config(**{k: v for k, v in llama(n).to_dict().items()
                                                        if k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "num_key_value_heads",
                                                                 "intermediate_size")}), base_tok),
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_ties_of_folders_loads_with_the_auto_classes_and_takes_new_rows_from_the_model_that_has_them(tmp_path,
                                                                                                       folders):
    out = merge_folders(MergeSpec("ties", (folders["a"], folders["b"]), base=folders["base"], density=0.5,
                                  lam=1.0), tmp_path / "ties", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(folders["b"]))  # the largest vocabulary's
    base, a, b, got = weights(folders["base"]), weights(folders["a"]), weights(folders["b"]), merged.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(got[name], ties(base[name], [a[name], b[name]], [1, 1], 0.5, 1.0))
    rows = base["model.embed_tokens.weight"].shape[0]
    for vocab_tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[vocab_tensor].shape[0] == rows + len(NEW_WORDS)
        torch.testing.assert_close(got[vocab_tensor][rows:], b[vocab_tensor][rows:], rtol=0, atol=0)
        shared = [t[vocab_tensor][:rows] for t in (a, b)]
        torch.testing.assert_close(got[vocab_tensor][:rows], ties(base[vocab_tensor][:rows], shared, [1, 1], 0.5, 1.0))
    record = json.loads((out / "config.json").read_text())["replaymix_merge"]
    assert record["method"] == "ties" and record["density"] == 0.5
    assert record["vocabulary"] == {"shared_rows": rows, "rows": rows + len(NEW_WORDS),
                                    "rows_past_shared_from": [str(folders["b"])], "tokenizer_from": str(folders["b"])}
    with torch.no_grad():
        assert merged(input_ids=torch.tensor([[3, rows + 1, 5]])).logits.shape == (1, 3, rows + len(NEW_WORDS))


def test_state_dicts_in_memory_merge_as_their_folders_do(tmp_path, folders):
    """The demo merges trainer checkpoints in memory: the same tensors as the folders' merge."""
    spec = MergeSpec("ties", (folders["a"], folders["b"]), base=folders["base"], density=0.5, lam=1.0)
    on_disk = weights(merge_folders(spec, tmp_path / "ties", progress=False))
    in_memory = merge_state_dicts(spec, [weights(folders["a"]), weights(folders["b"])], base=weights(folders["base"]))
    assert set(in_memory) == set(on_disk)
    for name, tensor in on_disk.items():
        torch.testing.assert_close(in_memory[name], tensor, rtol=0, atol=0)
    with pytest.raises(MergeError, match="beyond their rows"):
        merge_state_dicts(MergeSpec("linear", (folders["a"], folders["b"])),
                          [{"w": torch.zeros(3, 2)}, {"w": torch.zeros(4, 3)}])


def test_linear_interpolation_through_the_command(tmp_path, folders, capsys):
    out = tmp_path / "alpha"
    assert main(["--method", "linear", "--model", str(folders["base"]), "--model", str(folders["a"]),
                 "--weights", "0.75,0.25", "--out", str(out), "--no-progress"]) == 0
    base, a, got = weights(folders["base"]), weights(folders["a"]), weights(out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], 0.75 * base[name] + 0.25 * a[name])
    assert "merged 2 model(s) by linear" in capsys.readouterr().out


@pytest.mark.parametrize("other, density, reason", [
    ("qwen", 1.0, "is a Qwen2ForCausalLM but"),
    ("wide", 1.0, "hidden_size 32 vs 48"),
    ("a", 0.0, "--density 0.0: the share of each task vector kept must be in (0, 1]"),
    ("a", 1.5, "--density 1.5"),
])
def test_other_architectures_shapes_and_densities_are_refused_with_the_reason_and_nothing_written(
        tmp_path, folders, capsys, other, density, reason):
    out = tmp_path / "refused"
    status = main(["--method", "ties", "--base", str(folders["base"]), "--model", str(folders["a"]),
                   "--model", str(folders[other]), "--density", str(density), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and reason in err and err.count("\n") == 1
    assert not out.exists() and not out.with_name("refused.partial").exists()


def test_the_command_explains_itself_and_refuses_bad_flags_in_one_line(tmp_path, folders):
    shown = subprocess.run([sys.executable, "-m", "trainer.merge", "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and "--density" in shown.stdout and "ties" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "trainer.merge", "--method", "ties", "--model", str(folders["a"]),
                              "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr == (
        "error: --method ties adds task vectors (model minus base) to a base: give --base PATH\n")
    assert not (tmp_path / "x").exists()
