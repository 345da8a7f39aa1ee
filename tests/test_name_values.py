"""NAME=VALUE flags: one parser (service/name_values.py), so the service and the trainer read them alike."""

from __future__ import annotations

import argparse

import pytest

from service.name_values import name_values, number_list
from service.service_config import parse_args as service_args
from trainer.train_config import parse_args as trainer_args


def test_a_repeated_flag_takes_everything_after_the_first_equals_sign():
    assert name_values(["en=/data/a,b=c", "de=s3://bucket/de"], "--dataset") == {"en": "/data/a,b=c",
                                                                                 "de": "s3://bucket/de"}
    for bad in ("en", "=/data", "en="):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--dataset '{bad}': expected NAME=PATH"):
            name_values([bad], "--dataset", "PATH")
    with pytest.raises(argparse.ArgumentTypeError, match="--dataset en: given twice"):
        name_values(["en=/a", "en=/b"], "--dataset")


def test_a_comma_list_drops_blanks_and_refuses_what_is_not_a_number():
    assert number_list(" old=0.05, new=0.95,", "--weights") == {"old": 0.05, "new": 0.95}
    with pytest.raises(argparse.ArgumentTypeError, match="--weights old=x: 'x' is not a number"):
        number_list("old=x", "--weights")
    with pytest.raises(argparse.ArgumentTypeError, match="given twice"):
        number_list("old=1,old=2", "--weights")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=NUMBER"):
        number_list(" , ", "--weights")


def test_the_service_and_the_trainer_read_the_same_flags_alike(tmp_path, capsys):
    flags = ["--dataset", "old=/data/a,b", "--dataset", "new=/data/new", "--weights", "old=1, new=3"]
    service = service_args([*flags, "--seq-len", "8", "--global-batch", "4", "--state-dir", str(tmp_path),
                            "--allow-anonymous-reads"])
    trainer = trainer_args([*flags, "--out", str(tmp_path / "run")])
    assert service.datasets == trainer.data.datasets == {"old": "/data/a,b", "new": "/data/new"}
    assert service.weights == trainer.data.weights == {"old": 1.0, "new": 3.0}
    twice = ["--dataset", "old=/a", "--dataset", "old=/b"]
    for parse, rest in ((service_args, ["--seq-len", "8", "--global-batch", "4", "--state-dir", str(tmp_path),
                                        "--allow-anonymous-reads"]),
                        (trainer_args, ["--out", str(tmp_path / "run")])):
        with pytest.raises(SystemExit):
            parse([*twice, *rest])
        assert "--dataset old: given twice" in capsys.readouterr().err
