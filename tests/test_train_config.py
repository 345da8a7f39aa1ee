"""The trainer's flag policy is metadata on its config fields (issue 29): it cannot drift from the parser."""

from __future__ import annotations

from trainer.train_config import POLICIES, RESUMABLE_FLAGS, Resume, build_parser

# Flags without a field (help, and one kept only to point old command lines to its replacement) and fields
# without a flag (the Adam betas).
NO_FIELD = {"-h", "--help", "--lr-start-step"}
NO_FLAG = {"--beta1", "--beta2"}


def test_every_flag_sets_a_field_and_every_field_has_its_flag():
    options = {option for action in build_parser()._actions for option in action.option_strings}
    named = {policy.flag for policy in POLICIES}
    assert named - options == NO_FLAG
    assert options - named == NO_FIELD


def test_what_resume_may_change_is_said_once():
    may_change = [p.flag for p in POLICIES if p.resume is Resume.MAY_CHANGE]
    assert list(RESUMABLE_FLAGS) == list(dict.fromkeys(may_change))
    assert {"--steps", "--device", "--micro-batch", "--stream"} <= set(RESUMABLE_FLAGS)
    assert not {"--seq-len", "--global-batch", "--weights", "--max-lr"} & set(RESUMABLE_FLAGS)
    decided = {p.flag: p.service for p in POLICIES if p.service is not None}
    assert decided == {"--weights": "--weights", "--seq-len": "--seq-len", "--global-batch": "--global-batch",
                       "--data-seed": "--seed"}
