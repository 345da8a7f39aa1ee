"""`python -m recipe run recipe.yaml [--dry-run] [--fresh]`: your own continued pretraining as one job.

Locally the pipeline steps run on a Ray this job starts; on a cluster, submit the same command with
`ray job submit ... -- python -m recipe run /shared/recipe.yaml` and they join that cluster.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import yaml

from recipe.checks import check_recipe
from recipe.errors import RecipeError
from recipe.plan import make_plan
from recipe.dry_run import print_plan
from recipe.runner import Runner
from recipe.schema import key_table, line_of, load_recipe

EXAMPLE = """\
  model: hf:models/base                  # a save_pretrained folder with its tokenizer
  old: {en: data/en-sample.jsonl}        # a sample of what it was trained on: replayed
  updates:
    - name: de
      new: {de: data/de.jsonl}
      tokenizer: {extend: 4000}          # old corpora are tokenized with the extended tokenizer too
      replay: {sweep: [0, 0.01, 0.05, 0.25], pilot_steps: 200, choose: {budget: 0.05}}
      steps: 2000
  output: runs/base-de"""


def keys_help() -> str:
    rows = key_table()
    width = max(len(k) for k, _, _ in rows) + 2
    lines = []
    for key, default, description in rows:
        said = default == "-" or "(default" in description
        wrapped = textwrap.wrap(description if said else f"{description} (default: {default})",
                                width=100 - width) or [""]
        lines.append(f"  {key:<{width}}{wrapped[0]}")
        lines += [f"  {'':<{width}}{w}" for w in wrapped[1:]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipe", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog=f"A recipe (YAML):\n{EXAMPLE}\n\nEvery key (NAME: a name you choose; [] an item of a list):\n"
               f"{keys_help()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="run")
    run = commands.add_parser("run", help="plan the recipe and run every step not done yet",
                              description="Plan the recipe, check it, and run every step whose outputs are not "
                                          "there yet (a killed job continues where it stopped).", allow_abbrev=False,
                              epilog="Every key of a recipe, with its default: python -m recipe --help")
    run.add_argument("recipe", type=Path, help="the recipe file (YAML)")
    run.add_argument("--dry-run", action="store_true",
                     help="print each step, its inputs, outputs and exact command; check everything; run nothing")
    run.add_argument("--fresh", action="store_true",
                     help="build again the steps whose inputs or settings changed (their old outputs are moved "
                          "to OUTPUT/replaced/), instead of refusing them")
    return parser


def with_line(message: str, path: Path) -> str:
    """Prefix `message` ("KEY: ...") with the recipe file and the line of KEY, when it names one."""
    key = message.split(":", 1)[0]
    if not re.fullmatch(r"[A-Za-z_][\w.\-]*", key) or str(path) in message[:len(str(path)) + 1]:
        return message
    try:
        tree = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return message
    line = line_of(tree, [int(p) if p.isdigit() else p for p in key.split(".")])
    return f"{path} line {line}: {message}" if line else f"{path}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe, name = load_recipe(args.recipe)
        check_recipe(recipe, name)
        plan = make_plan(recipe, name)
        if args.dry_run:
            print_plan(plan)
            return 0
        Runner(plan, fresh=args.fresh).run()
    except RecipeError as e:
        print(f"error: {with_line(str(e), args.recipe)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
