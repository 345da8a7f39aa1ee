"""The pipeline's command lines: every flag documented with its default, one name per concept, and
`--help` that describes the command rather than its code."""

from __future__ import annotations

import argparse

import pytest

from pipeline.corpora.manpages import build_parser as manpages_parser
from pipeline.tokenize import build_parser as tokenize_parser
from pipeline.tokenize import parse_args as tokenize_args
from pipeline.tokenizer.__main__ import build_parser as tokenizer_parser
from pipeline.tokenizer.__main__ import config_from_args


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every pipeline command's parser, subcommands included."""
    parsers = {"pipeline.tokenize": tokenize_parser(), "pipeline.corpora.manpages": manpages_parser()}
    tokenizer = tokenizer_parser()
    [subcommands] = [a for a in tokenizer._actions if isinstance(a, argparse._SubParsersAction)]
    parsers |= {f"pipeline.tokenizer {name}": parser for name, parser in subcommands.choices.items()}
    return parsers


@pytest.mark.parametrize("name, parser", commands().items())
def test_every_flag_has_help_that_shows_its_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        shown = formatter._expand_help(action) if action.help else ""
        assert shown, f"{name} {flag} has no help"
        assert action.required or "default" in shown, f"{name} {flag}: no default in {shown!r}"
        assert "default: None" not in shown, f"{name} {flag}: say what decides the default: {shown!r}"


def test_one_flag_name_per_concept():
    parsers = commands()
    for concept in ("--address", "--num-cpus", "--debug"):
        assert all(concept in parser._option_string_actions for parser in parsers.values()), concept
    for name, parser in parsers.items():
        assert "--ray-address" not in parser.format_help(), name
    inputs = [parser._option_string_actions["--input"] for name, parser in parsers.items() if "manpages" not in name]
    assert len({(a.nargs, type(a), a.help) for a in inputs}) == 1  # --input a b and --input a --input b, everywhere


def test_the_old_address_flag_still_works_and_says_it_is_deprecated(capsys):
    args = tokenizer_parser().parse_args(["train", "--input", "x.jsonl", "--vocab-size", "8", "--out", "x.model",
                                          "--ray-address", "ray://head:10001"])
    assert config_from_args(args).address == "ray://head:10001"
    assert "warning: --ray-address is deprecated; use --address" in capsys.readouterr().err
    config, _ = tokenize_args(["--input", "a.jsonl", "--input", "b.jsonl", "c.jsonl", "--tokenizer", "t.model",
                               "--out", "ds"])
    assert config.inputs == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_tokenizer_help_describes_the_command():
    text = tokenizer_parser().format_help()
    assert text.split("\n\n")[1].startswith("Train a tokenizer on a corpus, or extend one")
    assert "python -m pipeline.tokenizer extend --base en.model" in text  # its examples, as written
    assert "python -m pipeline.tokenizer extend --base llama3-folder/" in text
    assert "parses flags into configs" not in text
