"""What the reliability scripts share: small real datasets, and a real `python -m service` process.

The service runs as a subprocess on a free 127.0.0.1 port, with its output in a log file (read back to
count tracebacks), so that it can be killed with SIGKILL and restarted on the same state dir exactly
as an operator's supervisor would. Datasets are written with the same helpers the test suite uses
(`tests/conftest.py`): a SentencePiece model trained here on small English and German text, documents
written with `pipeline.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import httpx
import numpy as np

from pipeline.dataset import MANIFEST_NAME
from tests.conftest import ENGLISH_WORDS, GERMAN_WORDS, make_lines, train_spm, write_token_dataset

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


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


def service_command(settings: ServiceSettings, port: int) -> list[str]:
    return [sys.executable, "-m", "service", *settings.args(), "--host", LOOPBACK, "--port", str(port),
            "--log-level", "warning"]


class ServiceProcess:
    """`python -m service` in a subprocess on a loopback port; restartable on the same state dir."""

    def __init__(self, settings: ServiceSettings, log_path: Path, port: int | None = None):
        self.settings, self.log_path = settings, Path(log_path)
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, ready_within: float = 60.0) -> "ServiceProcess":
        with open(self.log_path, "ab") as log:  # appended: one log across restarts
            self.proc = subprocess.Popen(service_command(self.settings, self.port), cwd=self.settings.code_root,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready(ready_within)
        return self

    def wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"service not ready on {self.url} within {limit:.0f} s; log {self.log_path}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def tracebacks(self) -> int:
        """Unhandled exceptions the service logged (each one is a 500 or a crash)."""
        return self.log_path.read_text(errors="replace").count("Traceback") if self.log_path.exists() else 0

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def try_start(settings: ServiceSettings, within: float = 60.0) -> tuple[int | None, str]:
    """Start the service once and report (exit code, output): None when it started serving instead."""
    port = free_port()
    proc = subprocess.Popen(
        service_command(settings, port), cwd=settings.code_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=2).status_code == 200:
                proc.terminate()
                return None, proc.communicate(timeout=10)[0]
        except httpx.TransportError:
            time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        return None, proc.communicate()[0]
    return proc.returncode, proc.communicate()[0]


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
