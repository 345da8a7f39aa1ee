"""What every pipeline command shares: its common flags, their help, the rule for paths under
`ray job submit`, and how a command ends: the absolute location of what it wrote, or one error line.

The commands are `python -m pipeline.tokenize`, `python -m pipeline.tokenizer train|extend` and
`python -m pipeline.corpora.manpages`. Each builds its parser with `new_parser` (every flag's help shows
its default), takes its inputs with `add_input_flags` and its Ray settings with `add_ray_flags`, so one
concept has one flag name everywhere, and runs its work through `run_command`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

from pipeline.errors import PipelineError, report_pipeline_error
from pipeline.ray_runtime import quiet_ray_data_console, submission_id
from pipeline.storage import is_uri

# A path flag's value: one path, several (--input), or None when the flag was not given.
PathValue = str | Path | Iterable[str | Path] | None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written; every optional flag's help ends with its default.

    A switch shows "(default: off)". A flag whose default is decided at run time (None: the cluster's
    CPUs, $RAY_ADDRESS...) says so in its own help, which then mentions "default" and is left as it is.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.nargs == 0:
            return f"{text} (default: off)"
        return super()._get_help_string(action)


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser; abbreviations are off, so a flag renamed later cannot be matched by accident."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """--input, --text-field, --split and --config, read the same way by every command (`pipeline.input_selection`, `pipeline.readers`)."""
    parser.add_argument("--input", nargs="+", action="extend", required=True, dest="inputs", metavar="PATH",
                        help="files, folders or globs of .jsonl (also .jsonl.gz, .jsonl.zst), .parquet, .arrow "
                             "(what `datasets` save_to_disk writes) or .txt (one document per file), local or as "
                             "s3://BUCKET/PREFIX/*.jsonl / gs://...; or a Hugging Face dataset, "
                             "hf://datasets/ORG/NAME; repeatable")
    parser.add_argument("--text-field", default="text", help="the JSON field or column holding the text")
    parser.add_argument("--split", default=None, metavar="NAME",
                        help="the split to read from a `datasets` DatasetDict folder (one with dataset_dict.json "
                             "and a folder per split) or an hf:// dataset; one with several splits needs it "
                             "(default: none)")
    parser.add_argument("--config", default=None, metavar="NAME",
                        help="the configuration (subset) of an hf://datasets/ORG/NAME input, e.g. sample-10BT "
                             "(default: the dataset's default)")


class _DeprecatedAlias(argparse.Action):
    """An old flag name that still works, with a warning naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str = "", **kwargs: object) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """--address, --num-cpus and --debug: where the command's Ray runs, and how much of it the user sees."""
    parser.add_argument("--address", default=None,
                        help="the Ray cluster to join (default: $RAY_ADDRESS, which `ray job submit` sets for its "
                             "job; else a Ray started in this process)")
    # `pipeline.tokenizer` called it --ray-address before every command had one name for it.
    parser.add_argument("--ray-address", dest="address", action=_DeprecatedAlias, replacement="--address",
                        help=argparse.SUPPRESS)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of a Ray started in this process (default: all of this machine's)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback and Ray Data's log lines too, not only the "
                             "one error line")


def refuse_relative_paths_in_job(paths: Mapping[str, PathValue]) -> None:
    """Under `ray job submit`, refuse relative path flags ({flag: value(s)}); elsewhere accept them.

    A job's working directory is Ray's temporary copy of the uploaded --working-dir: an input the upload
    left out (`.gitignore`d folders such as data/) is missing there, and an output written there "succeeds"
    and is deleted with the copy.
    """
    job = submission_id()
    if job is None:
        return
    relative = [f"{flag} {path}" for flag, value in paths.items() for path in _as_list(value)
                if not (is_uri(path) or Path(path).is_absolute())]
    if relative:
        raise PipelineError(
            f"{', '.join(relative)}: relative path{'s' if len(relative) > 1 else ''} in Ray job {job}, whose "
            "working directory is Ray's temporary copy of the upload (inputs the upload leaves out are missing "
            "there, and outputs would vanish with it); give absolute paths on storage every node mounts"
        )


def _as_list(value: PathValue) -> list[str | Path]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [value]
    return list(value)


def run_command(work: Callable[[], Path | str], paths: Mapping[str, PathValue], debug: bool = False) -> int:
    """Run a command's `work`, which returns what it wrote (a path or a URI); return the exit status.

    Relative `paths` are refused first under a Ray job. Ray Data's console log is kept quiet unless
    `debug`. On success the last line is `output: <absolute path>` (under `ray job submit` the only
    sign of where the output went); a user's mistake is one `error: ...` line and status 2.
    """
    try:
        refuse_relative_paths_in_job(paths)
        if not debug:
            quiet_ray_data_console()
        output = work()
    except Exception as e:  # noqa: BLE001 - ours (also inside a Ray task error) become one line; a bug re-raises
        return report_pipeline_error(e, debug)
    print(f"output: {output if is_uri(output) else Path(output).resolve()}", flush=True)
    return 0
