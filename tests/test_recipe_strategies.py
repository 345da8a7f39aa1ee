"""The recipe's other strategies beside replay (issue 25): an update that grows the model (`grow`, `train`)
and merges of its start and continued models scored beside the runs (`merges`).

One small job runs end to end on test_recipe.py's workspace (a tiny random 2-layer Llama with a byte-level
BPE tokenizer folder, English and German corpora): the tokenizer extended, the model grown by one identity
block of which only the new block and the new tokens' rows train, then a linear merge of the start model and
the continued one. The rest are the refusals at load, which start nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipe.errors import RecipeError
from recipe.plan import make_plan
from recipe.schema import load_recipe
from tests.test_recipe import fails, run_job, workspace, write  # noqa: F401 (workspace: a module fixture)
from trainer.checkpoint import load_checkpoint
from trainer.growth import GROWTH_KEY


def recipe_text(workspace: Path, out: Path, update: str = "", later: str = "", extra: str = "",
                model: str | None = None, replay: str = "{share: 0.1}") -> str:
    """A small recipe: update `de` (with the `update` lines), then the `later` updates."""
    data = workspace / "data"
    return (f"model: {model or 'hf:' + str(workspace / 'models' / 'base')}\n"
            + (f"tokenizer: {workspace / 'tokenizer'}\n" if model else "")
            + f"old: {{en: {data / 'en-sample.jsonl'}}}\n"
            "updates:\n"
            "  - name: de\n"
            f"    new: {{de: {data / 'de.jsonl'}}}\n"
            f"    replay: {replay}\n"
            "    steps: 4\n"
            f"{update}{later}"
            "data: {seq_len: 32, global_batch: 8, micro_batch: 4}\n"
            "evaluation: {every: 4, batches: 2}\n"
            "training: {checkpoint_every: 4}\n"
            f"{extra}"
            f"output: {out}\n")


GROWN = ("    tokenizer: {extend: 20}\n"
         "    grow: blocks:1\n"
         "    train: new-blocks\n"
         "    merges: [{method: linear, alpha: 0.5}]\n")


@pytest.fixture(scope="module")
def grown_job(workspace, tmp_path_factory) -> Path:
    """The small job run once: the tokenizer extended, one block grown (only it and the new rows train), a
    linear merge of the start and the continued model. Its output folder."""
    root = tmp_path_factory.mktemp("strategies")
    recipe = write(root / "grown.yaml", recipe_text(workspace, root / "out", GROWN,
                                                    extra="compute: {cpus: 2, threads: 1}\n"))
    result = run_job(recipe)
    assert result.returncode == 0, result.stdout[-6000:]
    return root / "out"


@pytest.mark.slow
def test_a_grown_update_trains_only_its_new_block_and_rows_and_a_merge_is_scored_beside_it(grown_job, workspace):
    from transformers import AutoModelForCausalLM

    run = grown_job / "runs" / "de" / "train"
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    record = final["model_config"]["config"][GROWTH_KEY]
    assert record["grow"] == "blocks:1" and record["layers_before"] == 2 and record["new_layers"] == [2]
    start = AutoModelForCausalLM.from_pretrained(workspace / "models" / "base").state_dict()
    continued = {k.removeprefix("hf."): v for k, v in final["model"].items()}
    # The grown model's old layers are the start's layers in order; the inserted one is new.
    old_layers = [i for i in range(3) if i not in record["new_layers"]]
    kept = []
    for name, tensor in continued.items():
        if ".layers." in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            if index in record["new_layers"]:
                continue
            before = start[name.replace(f".layers.{index}.", f".layers.{old_layers.index(index)}.")]
        else:
            before = start[name]
        rows = before.shape[0]
        kept.append((name, torch.equal(tensor[:rows], before)))
        if tensor.shape != before.shape:  # the embedding: the extension's new token rows train
            assert tensor.shape[0] > rows and record["new_token_rows_from"] == rows
            assert not torch.equal(tensor[rows:], torch.zeros_like(tensor[rows:]))
    assert all(same for _, same in kept), [name for name, same in kept if not same]
    inserted = {k: v for k, v in continued.items() if ".layers.2." in k}
    assert not torch.equal(inserted["model.layers.2.self_attn.o_proj.weight"],
                           torch.zeros_like(inserted["model.layers.2.self_attn.o_proj.weight"]))  # it trained
    exported = AutoModelForCausalLM.from_pretrained(grown_job / "model")
    assert exported.config.num_hidden_layers == 3

    merge = json.loads((grown_job / "merges" / "de" / "merge-linear-0.5.json").read_text())
    assert set(merge["losses"]) == {"en", "de", "en-base"} and merge["merge"]["weights"] == [0.5, 0.5]
    report = (grown_job / "report.md").read_text()
    assert "de/train (grown blocks:1, training new-blocks)" in report
    rows = [line for line in report.splitlines() if line.startswith("| de/merge-linear-0.5 |")]
    assert len(rows) == 2  # the run table and the compute table
    assert "0 (no training)" in rows[0] and f"{merge['losses']['de']:.3f} / " in rows[0]
    assert "no training" in rows[1]


@pytest.mark.slow
def test_a_merge_is_reused_while_its_inputs_are_unchanged(grown_job):
    from dataclasses import replace

    from recipe.runner import StepRecords

    recipe, name = load_recipe(grown_job.parent / "grown.yaml")
    merge = make_plan(recipe, name).merges["de"][0]
    records = StepRecords(grown_job)
    assert records.state(merge) == ("done", "")
    option = merge.option.model_copy(update={"alpha": 0.25})
    state, differs = records.state(replace(merge, option=option))
    assert state == "changed" and "weights" in differs


def test_the_plan_grows_only_the_update_that_says_so(workspace, tmp_path):
    later = ("  - name: more\n"
             f"    new: {{more: {workspace / 'data' / 'de-heldout.jsonl'}}}\n"
             "    steps: 2\n"
             "    merges: [{method: ties, density: 0.2, lambda: 0.8}]\n")
    text = recipe_text(workspace, tmp_path / "out", "    grow: blocks:1\n    train: new-blocks\n", later,
                       replay="{sweep: [0, 0.5], pilot_steps: 2, choose: {budget: 0.1}}")
    recipe, name = load_recipe(write(tmp_path / "two.yaml", text))
    plan = make_plan(recipe, name, {"de": 0.5})
    de, more = plan.runs["de"], plan.runs["more"]
    assert {p.trainer.grow for p in plan.pilots["de"]} == {"blocks:1"}  # the pilots measure the grown model
    assert (de.trainer.grow, de.trainer.train) == ("blocks:1", "new-blocks")
    # The next update continues the grown checkpoint as it is: grown once, by the update that says so.
    assert more.trainer.init_from == de.run_dir / "checkpoints" / "final.pt"
    assert (more.trainer.grow, more.trainer.train) == (None, "all")
    ties = plan.merges["more"][0]
    assert ties.start == de.run_dir / "checkpoints" / "final.pt" and ties.name == "more/merge-ties-0.2"
    spec = ties.spec()
    assert (spec.method, spec.base, spec.density, spec.lam) == ("ties", ties.start, 0.2, 0.8)


@pytest.mark.parametrize("update, model, says", [
    ("    grow: blocks:two\n", None, ["line 8", "updates.0.grow", "expected blocks:N"]),
    ("    train: new-blocks\n", None, ["line 8", "updates.0.train", "add grow: blocks:N"]),
    ("    grow: experts:4,top_k:2\n    train: new-blocks\n", None, ["line 9", "updates.0.train"]),
    ("    merges: [{method: ties, density: 1.5}]\n", None, ["line 8", "updates.0.merges.0.density", "1"]),
    ("    merges: [{method: slerp}]\n", None, ["line 8", "updates.0.merges.0.method", "'ties'"]),
    ("    merges:\n      - {method: linear}\n      - {method: ties, alpha: 0.3}\n", None,
     ["line 10", "updates.0.merges.1", "alpha weighs"]),
    ("    grow: blocks:1\n", "tiny", ["line 9", "updates.0.grow", "fresh model"]),
    ("    merges: [{method: linear}]\n", "tiny", ["line 9", "updates.0.merges", "random weights"]),
    ("    grow: blocks:1\n  - {name: more, new: {more: MORE}, steps: 2, grow: blocks:1}\n", None,
     ["line 9", "updates.1.grow", "not grown again"]),
])
def test_what_the_trainer_or_a_merge_would_refuse_is_refused_at_load_naming_key_and_line(
        capsys, workspace, tmp_path, update, model, says):
    out = tmp_path / "out"
    text = recipe_text(workspace, out, update.replace("MORE", str(workspace / "data" / "de-heldout.jsonl")),
                       model=model)
    message = fails(capsys, write(tmp_path / "bad.yaml", text))
    for part in says:
        assert part in message, message
    assert not out.exists()  # nothing written


def test_a_fresh_models_later_update_may_grow(workspace, tmp_path):
    text = recipe_text(workspace, tmp_path / "out", "  - {name: more, new: {more: MORE}, steps: 2, grow: blocks:1}\n"
                       .replace("MORE", str(workspace / "data" / "de-heldout.jsonl")), model="tiny")
    recipe, name = load_recipe(write(tmp_path / "fresh.yaml", text))
    assert make_plan(recipe, name).runs["more"].trainer.grow == "blocks:1"
    with pytest.raises(RecipeError, match="updates.0.grow"):
        make_plan(*load_recipe(write(tmp_path / "first.yaml", text.replace(
            "    steps: 4\n", "    steps: 4\n    grow: blocks:1\n"))))
