"""FSDP2 on the CPU: 2 processes with the gloo backend shard the real training loop's model (--fsdp).

The sharded run must train the weights a 1-process run trains (up to rounding: gradients are averaged by
a reduce-scatter instead of over micro-batches), each rank holding only its shards; a run resumed from a
sharded checkpoint must be the uninterrupted sharded run to the bit; and a Hugging Face model comes back
whole as a save_pretrained folder gathered from the shards.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from service.launcher import free_port
from tests.test_ddp import _flags, _records, datasets  # noqa: F401  (a fixture)
from tests.test_trainer import Crash, checkpoint_of
from trainer.fsdp import full_model_state
from trainer.train import train
from trainer.train_config import parse_args

# Every rank imports this module (mp.spawn sends _worker and the step hooks by name): it imports neither
# transformers' models nor test_hf_model, which would cost each rank seconds; the Hugging Face test imports
# what it needs itself.
torch.set_num_threads(1)
STEPS = 6
RUN = ["--steps", str(STEPS), "--checkpoint-every", "2"]


def _worker(rank: int, world_size: int, port: int, flags: list[str], on_step: Callable | None = None) -> None:
    """One rank of a run; a simulated crash (Crash) ends it as a killed process would, without a checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(parse_args(flags), on_step=on_step)
    except Crash:
        pass
    finally:
        dist.destroy_process_group()


def _spawn(flags: list[str], on_step: Callable | None = None) -> None:
    mp.spawn(_worker, args=(2, free_port(), flags, on_step), nprocs=2, join=True)


def _gather_weights(out: Path, last: int, step: int, model: torch.nn.Module, batch) -> None:
    """After step `last`: the whole model gathered from the shards (the --save-hf path), saved by rank 0;
    and each rank must have held about half of it."""
    local = sum(p.to_local().numel() for p in model.parameters())
    assert local <= model.num_params() // 2 + 4096, f"rank {dist.get_rank()} holds {local} of {model.num_params()}"
    if step == last:
        weights = full_model_state(model)
        if dist.get_rank() == 0:
            torch.save(weights, out)


def _crash_after(step: int, done: int, model: torch.nn.Module, batch) -> None:
    if done == step:
        raise Crash(f"simulated crash after step {done}")


def _save_and_crash(out: Path, last: int, crash: int, step: int, model: torch.nn.Module, batch) -> None:
    _gather_weights(out, last, step, model, batch)
    _crash_after(crash, step, model, batch)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, datasets) -> tuple[Path, Path]:
    """An uninterrupted 2-rank --fsdp run and the whole model gathered from its shards after the last step
    (each rank checked to hold about half): what one process must train and what a resumed sharded run must
    be, run once for both tests."""
    folder = tmp_path_factory.mktemp("sharded")
    _spawn([*_flags(datasets, folder / "run"), *RUN, "--fsdp"],
           functools.partial(_gather_weights, folder / "weights.pt", STEPS))
    return folder / "run", folder / "weights.pt"


@pytest.mark.timeout(300)
def test_sharded_run_trains_the_weights_of_one_process(tmp_path, datasets, sharded_run):
    fsdp, fsdp_weights = sharded_run
    train(parse_args([*_flags(datasets, tmp_path / "single"), *RUN]))

    sharded, single = torch.load(fsdp_weights), checkpoint_of(tmp_path / "single")["model"]
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
    for kind in ("train", "eval"):
        fsdp_records, single_records = _records(fsdp, kind), _records(tmp_path / "single", kind)
        assert [r["step"] for r in fsdp_records] == [r["step"] for r in single_records]
        for a, b in zip(fsdp_records, single_records, strict=True):
            loss = "loss" if kind == "train" else "val_loss"
            assert a[loss] == pytest.approx(b[loss], abs=1e-4)
    # Sharded checkpoints: one folder of shards per name, no .pt.
    names = sorted(p.name for p in (fsdp / "checkpoints").iterdir())
    assert names == ["final.dcp", "latest.dcp"]


@pytest.mark.timeout(300)
def test_resume_from_a_sharded_checkpoint_is_the_uninterrupted_run(tmp_path, datasets, sharded_run):
    straight, straight_weights = sharded_run
    stopped = tmp_path / "stopped"
    # Killed in step 4 (before its checkpoint): the step-2 checkpoint is the latest, and step 3's records
    # must be dropped.
    _spawn([*_flags(datasets, stopped), *RUN, "--fsdp"], functools.partial(_crash_after, 4))
    assert max(r["step"] for r in _records(stopped, "train")) == 3
    _spawn([*_flags(datasets, stopped), *RUN, "--fsdp", "--resume"],
           functools.partial(_gather_weights, tmp_path / "stopped.pt", STEPS))

    assert [r["step"] for r in _records(straight, "train")] == list(range(1, STEPS + 1))
    drop_time = lambda records: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait_share")}
                                 for r in records]
    assert drop_time(_records(stopped, "train")) == drop_time(_records(straight, "train"))  # to the bit
    assert _records(stopped, "eval") == _records(straight, "eval")
    a, b = torch.load(tmp_path / "stopped.pt"), torch.load(straight_weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_refuses_one_process_and_a_plain_resume_of_shards(tmp_path, datasets, capsys):
    from trainer.__main__ import main

    assert main([*_flags(datasets, tmp_path / "one"), "--fsdp"]) == 2
    assert "--fsdp shards the model over the ranks torchrun" in capsys.readouterr().err
    fake = tmp_path / "run" / "checkpoints" / "latest.dcp"
    fake.mkdir(parents=True)
    (fake / ".metadata").write_bytes(b"")
    torch.save({"run_config": {}, "step": 1}, fake / "trainer.pt")
    assert main([*_flags(datasets, tmp_path / "run"), "--resume"]) == 2
    assert "a sharded checkpoint (an --fsdp run's); resume that run with --fsdp" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_a_hugging_face_model_continued_sharded_comes_back_whole(tmp_path, base_tokenizer, english_lines,
                                                                 german_lines):
    """A Llama (tied embeddings) continued from a trainer checkpoint, its AdamW state handed to the shards by
    name, trains under --fsdp what one process trains, and --save-hf gathers it into a folder."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_token_dataset
    from tests.test_hf_model import flags, make_model_folder

    datasets = {"en": write_token_dataset(tmp_path / "en", english_lines[:300], base_tokenizer, english_lines[1900:]).root,
                "de": write_token_dataset(tmp_path / "de", german_lines[:300], base_tokenizer, german_lines[1900:]).root}
    source = make_model_folder(tmp_path / "llama", "llama", base_tokenizer)
    common = ["--micro-batch", "2", "--max-lr", "2e-3", "--eval-every", "3"]
    train(parse_args(flags(datasets, tmp_path / "phase1", "--init-from", f"hf:{source}", "--steps", "2", *common)))
    start = ["--init-from", str(tmp_path / "phase1" / "checkpoints" / "final.pt"), "--steps", "3", *common]
    _spawn([*flags(datasets, tmp_path / "fsdp", *start), "--fsdp"])
    train(parse_args(flags(datasets, tmp_path / "single", *start)))

    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "hf").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "hf").state_dict()
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(single["model.embed_tokens.weight"],
                           AutoModelForCausalLM.from_pretrained(source).state_dict()["model.embed_tokens.weight"])
