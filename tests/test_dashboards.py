"""--log-to tensorboard,wandb (trainer/dashboards.py): the event files a run writes, read back, hold what
metrics.jsonl holds (loss, learning rate, tokens/s, data wait, the replay share of each step, each set's
evaluation) and the mix in force; a logger whose package is absent is one error line naming the extra.

tensorboard and wandb are in the test extra (pyproject.toml), so CI runs these; they skip only where a
package is missing (a base install)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main
from trainer.metrics_log import read_metrics

torch.set_num_threads(1)


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the run's offline W&B file: a LevelDB-style log (a 7-byte ':W&B' header, then
    records of a 7-byte header and a protobuf `Record`, in 32 KiB blocks) that wandb no longer reads in Python."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        pending = (b"" if kind in (1, 2) else pending) + data[pos + 7:pos + 7 + length]  # FULL/FIRST start one
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST end one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_the_dashboards_hold_what_metrics_jsonl_holds(tmp_path, token_dataset_factory, english_model,
                                                      english_lines, german_lines):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    english = token_dataset_factory("en", english_lines[:300], english_model, english_lines[1900:])
    german = token_dataset_factory("de", german_lines[:300], english_model, german_lines[1900:])
    run = tmp_path / "run"
    assert main([f"--dataset=en={english.root}", f"--dataset=de={german.root}", "--weights", "en=3,de=1",
                 "--model", "test", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "8", "--steps", "3",
                 "--eval-every", "2", "--eval-batches", "1", "--no-progress", "--log-to", "tensorboard,wandb",
                 "--out", str(run)]) == 0
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    expected = {
        "train/loss": {r["step"]: r["loss"] for r in train},
        "train/lr": {r["step"]: r["lr"] for r in train},
        "train/tokens_per_s": {r["step"]: r["tokens_per_s"] for r in train},
        "train/data_wait_share": {r["step"]: r["data_wait_share"] for r in train},
        "replay/share/de": {r["step"]: r["source_share"]["de"] for r in train},
        "eval/loss/en": {r["step"]: r["val_loss"]["en"] for r in evals},
        "eval/forgetting/de": {r["step"]: r["forgetting"]["de"] for r in evals},
        "mix/weight/de": {0: 0.25},  # the in-process --weights, charted once, with the first record
    }
    assert sorted(expected["eval/loss/en"]) == [0, 2, 3] and expected["replay/share/de"] == {1: 0.25, 2: 0.25, 3: 0.25}

    scalars = tensorboard_scalars(run)
    for tag, values in expected.items():
        assert scalars[tag] == pytest.approx(values, rel=1e-6), tag  # event files hold float32

    history = wandb_history(run)
    for tag, values in expected.items():
        assert {row["_step"]: row[tag] for row in history if tag in row} == pytest.approx(values), tag
    assert any(row.get("mix/change") == "--weights: stage en=0.75, de=0.25 from step 0" for row in history)


def test_an_uninstalled_logger_is_one_error_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: find_spec finds nothing
    with pytest.raises(SystemExit) as refused:
        main(["--dataset=en=x", "--log-to", "tensorboard,wandb", "--out", str(tmp_path / "run")])
    assert refused.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == ["python -m trainer: error: --log-to wandb: the wandb package is not installed; install the "
                      "dashboards extra (pip install 'replaymix[dashboards]', or pip install wandb)"]
    assert not (tmp_path / "run").exists()


def tensorboard_texts(run_dir: Path, tag: str) -> dict[int, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


def test_the_services_mix_changes_are_charted_with_the_share_they_set(tmp_path, token_dataset_factory,
                                                                      english_model, english_lines, german_lines):
    pytest.importorskip("tensorboard")
    from tests.test_service import READ_TOKEN, TOKEN, ServiceProcess, free_port, put_mix, service_args

    old = token_dataset_factory("old", english_lines[:120], english_model)
    new = token_dataset_factory("new", german_lines[:200], english_model)
    admin = tmp_path / "admin-token"
    admin.write_text(TOKEN + "\n")
    service = ServiceProcess(service_args({"old": old.root, "new": new.root}, tmp_path / "state", admin,
                                          "old=0.25,new=0.75", seq_len=32, global_batch=8), free_port()).start()
    try:
        changed = put_mix(service.url, {"weights": {"old": 0.5, "new": 0.5}, "start_step": 2, "by": "alice",
                                        "reason": "more replay"})
        assert changed.status_code == 200
        read_token = tmp_path / "read-token"
        read_token.write_text(READ_TOKEN + "\n")
        run = tmp_path / "run"
        assert main(["--stream", service.url, "--stream-token-file", str(read_token), "--model", "test",
                     "--micro-batch", "8", "--steps", "3", "--eval-every", "0", "--no-progress",
                     "--log-to", "tensorboard", "--out", str(run)]) == 0
    finally:
        service.stop()
    # The share in force at each step, from the batch's sources: the operator's change lands at batch 2 (step 3).
    assert tensorboard_scalars(run)["replay/share/old"] == {1: 0.25, 2: 0.25, 3: 0.5}
    changes = tensorboard_texts(run, "mix/change")
    assert list(changes) == [1]  # learnt of with the first record; the service's own first stage before it
    assert changes[1].splitlines()[-1] == "alice (127.0.0.1): stage new=0.5, old=0.5 from step 2 (more replay)"
