"""What the reliability scripts share: small real datasets, and a real `python -m service` process.

The service runs as a subprocess (`service/launcher.py`) on a free 127.0.0.1 port, with its output in a
log file (read back to count tracebacks, its tail shown when it fails to start), so that it can be
killed with SIGKILL and restarted on the same state dir exactly as an operator's supervisor would.
Datasets are written with the same helpers the test suite uses (`tests/conftest.py`): a SentencePiece
model trained here on small English and German text, documents written with `pipeline.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import httpx
import numpy as np

from pipeline.dataset import MANIFEST_NAME
from service import launcher
from tests.conftest import ENGLISH_WORDS, GERMAN_WORDS, make_lines, train_spm, write_token_dataset

REPO = Path(__file__).resolve().parents[2]


def build_datasets(folder: Path, old_docs: int = 200, new_docs: int = 200) -> dict[str, Path]:
    """An English "old" and a German "new" dataset sharing one tokenizer; reused when already built."""
    folder = Path(folder)
    paths = {"old": folder / "old", "new": folder / "new"}
    if all((p / MANIFEST_NAME).exists() for p in paths.values()):
        return paths
    english = make_lines(ENGLISH_WORDS, old_docs, seed=1)
    german = make_lines(GERMAN_WORDS, new_docs, seed=2)
    model = train_spm(english + german, folder / "spm" / "mixed", vocab_size=200)
    write_token_dataset(paths["old"], english, model)
    write_token_dataset(paths["new"], german, model)
    return paths


def committed_code(folder: Path) -> Path:
    """The service and pipeline packages as committed at HEAD, extracted into `folder`.

    Others edit the working tree while these scripts run; measuring the committed code keeps a figure
    tied to a commit instead of to whatever half-made edit was on disk at the time.
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "service", "pipeline"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def code_root(work: Path, from_head: bool) -> Path:
    """REPO itself, or (with --from-head) a copy of the committed service under `work`."""
    return committed_code(Path(work) / "code") if from_head else REPO


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def write_admin_token(path: Path) -> str:
    token = secrets.token_hex(16)
    path.write_text(token + "\n")
    return token


@dataclass(frozen=True)
class ServiceSettings:
    """The flags of one `python -m service` (see service/service_config.py), minus host, port and log level."""

    datasets: dict[str, Path]
    state_dir: Path
    weights: str = "old=0.25,new=0.75"
    seq_len: int = 16
    global_batch: int = 8
    seed: int = 5
    admin_token_file: Path | None = None
    read_token_file: Path | None = None  # None: anonymous reads (every harness service listens on loopback only)
    verify: str | None = None  # None: the service's default check
    code_root: Path = REPO  # where `python -m service` imports the service from (see committed_code)

    def args(self) -> list[str]:
        args = [f"--dataset={name}={path}" for name, path in self.datasets.items()]
        args += [f"--weights={self.weights}", f"--seq-len={self.seq_len}", f"--global-batch={self.global_batch}",
                 f"--seed={self.seed}", f"--state-dir={self.state_dir}"]
        if self.verify is not None:
            args.append(f"--verify={self.verify}")
        if self.admin_token_file is not None:
            args.append(f"--admin-token-file={self.admin_token_file}")
        args.append(f"--read-token-file={self.read_token_file}" if self.read_token_file else "--allow-anonymous-reads")
        return args


class ServiceProcess(launcher.ServiceProcess):
    """The service of `settings`, its output appended to `log_path` across restarts on the same state dir."""

    def __init__(self, settings: ServiceSettings, log_path: Path, port: int | None = None):
        super().__init__(settings.args(), port, log=Path(log_path), cwd=settings.code_root)
        self.settings = settings

    def tracebacks(self) -> int:
        """Unhandled exceptions the service logged (each one is a 500 or a crash)."""
        return self.output().count("Traceback")


def try_start(settings: ServiceSettings, within: float = 60.0) -> tuple[int | None, str]:
    """Start the service once and report (exit code, output): None when it started serving instead."""
    service = launcher.ServiceProcess(settings.args(), cwd=settings.code_root)
    try:
        service.start(ready_within=within)
    except launcher.ServiceDidNotStart as refused:
        return refused.exit_code, service.output()
    service.stop()
    return None, service.output()


def put_mix(http: httpx.Client, token: str, weights: dict[str, float], start_step: int | None = None) -> httpx.Response:
    body: dict = {"weights": weights}
    if start_step is not None:
        body["start_step"] = start_step
    return http.put("/v1/mix", json=body, headers={"Authorization": f"Bearer {token}"})


def replay_schedule(http: httpx.Client, token: str, schedule: Sequence[dict]) -> None:
    """Give a fresh service (nothing served yet), started with the first stage's weights, the later stages."""
    first = http.get("/v1/mix").json()["schedule"]
    if first != schedule[:1]:
        raise RuntimeError(f"the fresh service starts with {first}, the schedule to replay with {schedule[:1]}")
    for stage in schedule[1:]:
        response = put_mix(http, token, stage["weights"], stage["start_step"])
        response.raise_for_status()


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 99)) -> list[float]:
    data = np.fromiter(values, dtype=np.float64)
    return [float(np.percentile(data, q)) if len(data) else float("nan") for q in qs]


def print_figures(title: str, figures: dict[str, object]) -> None:
    """The figures one per line, aligned, under a title."""
    print(f"\n{title}")
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value}")


# --- the pipeline ---------------------------------------------------------------------------------


def write_corpus(path: Path, old_docs: int = 600, new_docs: int = 600) -> Path:
    """A JSONL corpus ({"text": ...} per line) of English and German pseudo-sentences."""
    lines = make_lines(ENGLISH_WORDS, old_docs, seed=3) + make_lines(GERMAN_WORDS, new_docs, seed=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def tokenize_command(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    """`python -m pipeline.tokenize` on one local CPU, with small shards so a run writes several."""
    return [sys.executable, "-m", "pipeline.tokenize", "--input", str(corpus), "--tokenizer", str(tokenizer),
            "--out", str(out), "--num-cpus", "1", "--shard-tokens", "2000", "--val-fraction", "0.05", *extra]


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: equal digests mean byte-identical trees."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).rglob("*")) if path.is_file()
    }
