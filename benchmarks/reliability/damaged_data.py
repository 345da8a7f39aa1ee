"""Damaged data: does the service refuse to start on a damaged dataset, naming the file? Does the
pipeline refuse to overwrite a valid dataset unless told to?

    .venv/bin/python -m benchmarks.reliability.damaged_data [--work /tmp/replaymix-damaged] [--skip-overwrite-run]

Each damage is applied to a copy of a healthy dataset, which is then served beside an intact one with
`python -m service` as it starts by default (no flag: a full check), `--verify size` (file sizes against
the manifest; the documented fast start, which trusts the bytes) and `--verify full` (sha256 of every
file against the manifest). A damage is refused when the service exits with status 2 and its message
names the damaged file. The check passes when the default and `full` refuse every damage. Then `python -m pipeline.tokenize` is pointed at a valid
dataset without `--overwrite` (must refuse, files unchanged), at a folder that is not a dataset (must
refuse even with `--overwrite`), and with `--overwrite` (must replace it with a valid dataset).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from benchmarks.reliability.harness import (
    REPO,
    ServiceSettings,
    build_datasets,
    code_root,
    folder_digest,
    head_commit,
    print_figures,
    tokenize_command,
    try_start,
    write_corpus,
)
from pipeline.dataset import MANIFEST_NAME, TokenDataset

# Column name -> the service's --verify flag (None: no flag, the default start).
VERIFY_MODES = {"default": None, "size": "size", "full": "full"}
MUST_REFUSE = ("default", "full")  # `size` trusts the bytes by design: reported, not required


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    edit(manifest)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _lie_about_tokens(manifest: dict) -> None:
    """A consistent lie: one shard and its split total both claim 10 more tokens."""
    manifest["splits"]["train"]["shards"][1]["tokens"] += 10
    manifest["splits"]["train"]["tokens"] += 10


def _lie_about_documents(manifest: dict) -> None:
    manifest["splits"]["train"]["shards"][1]["documents"] -= 1
    manifest["splits"]["train"]["documents"] -= 1


@dataclass(frozen=True)
class Damage:
    name: str
    file: str  # the file a useful message names
    apply: Callable[[Path], None]


DAMAGES = [
    Damage("flipped bytes in a shard", "train-00001.bin", lambda root: _flip_bytes(root / "train-00001.bin")),
    Damage("flipped bytes in an index", "train-00001.idx", lambda root: _flip_bytes(root / "train-00001.idx")),
    Damage("truncated shard", "train-00002.bin", lambda root: _truncate(root / "train-00002.bin")),
    Damage("missing shard", "train-00003.bin", lambda root: (root / "train-00003.bin").unlink()),
    Damage("missing tokenizer copy", "tokenizer/tokenizer.model", lambda root: (root / "tokenizer" / "tokenizer.model").unlink()),
    Damage("manifest lies about token counts", "train-00001.bin", lambda root: _edit_manifest(root, _lie_about_tokens)),
    Damage("manifest lies about document counts", "train-00001.idx",
           lambda root: _edit_manifest(root, _lie_about_documents)),
]


@dataclass
class DamagedResult:
    refused: dict[tuple[str, str], bool] = field(default_factory=dict)  # (damage, verify mode) -> refused
    messages: dict[tuple[str, str], str] = field(default_factory=dict)
    pipeline_checks: dict[str, bool] = field(default_factory=dict)

    def refused_count(self, mode: str) -> int:
        return sum(ok for (_, m), ok in self.refused.items() if m == mode)

    @property
    def ok(self) -> bool:
        # Nothing checks checksums after the start, so the default start must refuse everything.
        required = [ok for (_, mode), ok in self.refused.items() if mode in MUST_REFUSE]
        return all(required) and all(self.pipeline_checks.values())

    def summary(self) -> str:
        return (
            "damaged data: refused (exit 2 naming the file) "
            + ", ".join(f"{mode} {self.refused_count(mode)}/{len(DAMAGES)}" for mode in VERIFY_MODES)
            + "; pipeline "
            f"overwrite checks {sum(self.pipeline_checks.values())}/{len(self.pipeline_checks)} -> "
            f"{'OK' if self.ok else 'FAILED'}"
        )


def damaged_copy(work: Path, healthy: Path, damage: Damage) -> Path:
    damaged = Path(work) / "damaged" / damage.name.replace(" ", "-")
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(healthy, damaged)
    damage.apply(damaged)
    return damaged


def start_on_damaged(work: Path, datasets: dict[str, Path], damaged: Path, damage: Damage, mode: str | None,
                     code: Path = REPO) -> tuple[bool, str]:
    """Start the service on the intact "old" and the damaged "new"; (refused naming the file, message)."""
    settings = ServiceSettings({"old": datasets["old"], "new": damaged}, Path(work) / f"state-{mode or 'default'}",
                               verify=mode, code_root=code)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    status, output = try_start(settings)
    return status == 2 and damage.file in output, "started and served" if status is None else output.strip()[-300:]


def check_service_refusals(work: Path, datasets: dict[str, Path], code: Path, result: DamagedResult) -> None:
    for damage in tqdm(DAMAGES, desc="damages", unit="damage"):
        damaged = damaged_copy(work, datasets["new"], damage)
        for mode, flag in VERIFY_MODES.items():
            refused, message = start_on_damaged(work, datasets, damaged, damage, flag, code)
            result.refused[damage.name, mode], result.messages[damage.name, mode] = refused, message


def check_pipeline_overwrite(work: Path, datasets: dict[str, Path], code: Path, run_overwrite: bool,
                             result: DamagedResult) -> None:
    corpus = write_corpus(work / "corpus.jsonl", 100, 100)
    tokenizer = TokenDataset(datasets["old"]).tokenizer_path
    target = work / "valid-dataset"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(datasets["old"], target)
    before = folder_digest(target)

    def tokenize(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(tokenize_command(corpus, tokenizer, out, *extra), cwd=code, capture_output=True,
                              text=True, timeout=600)

    refused = tokenize(target)
    result.pipeline_checks["refuses a valid dataset without --overwrite"] = (
        refused.returncode == 2 and str(target) in refused.stderr and "--overwrite" in refused.stderr
        and folder_digest(target) == before)
    foreign = work / "not-a-dataset"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("someone's files\n")
    refused = tokenize(foreign, "--overwrite")
    result.pipeline_checks["refuses a non-dataset folder even with --overwrite"] = (
        refused.returncode == 2 and str(foreign) in refused.stderr and (foreign / "notes.txt").exists())
    if run_overwrite:
        replaced = tokenize(target, "--overwrite")
        valid = replaced.returncode == 0 and TokenDataset(target, verify="full").train.num_tokens > 0
        result.pipeline_checks["replaces it with --overwrite"] = valid and folder_digest(target) != before


def run_damaged_data(work: Path, code: Path = REPO, run_overwrite: bool = True) -> DamagedResult:
    work = Path(work)
    datasets = build_datasets(work / "datasets")
    result = DamagedResult()
    check_service_refusals(work, datasets, code, result)
    check_pipeline_overwrite(work, datasets, code, run_overwrite, result)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-damaged"))
    parser.add_argument("--skip-overwrite-run", action="store_true", help="skip the (Ray) --overwrite run")
    parser.add_argument("--from-head", action="store_true", help="run the service and pipeline as committed at HEAD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = run_damaged_data(args.work, code_root(args.work, args.from_head), not args.skip_overwrite_run)
    figures: dict[str, object] = {}
    for damage in DAMAGES:
        figures[damage.name] = "  ".join(
            f"{mode}: {'refused' if result.refused[damage.name, mode] else 'ACCEPTED':<8}" for mode in VERIFY_MODES)
    figures.update({check: "yes" if ok else "NO" for check, ok in result.pipeline_checks.items()})
    print_figures(f"damaged data (code at {head_commit() if args.from_head else 'the working tree'})", figures)
    for (name, mode), refused in result.refused.items():
        print(f"  [{mode}] {name}: {result.messages[name, mode]}")
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
