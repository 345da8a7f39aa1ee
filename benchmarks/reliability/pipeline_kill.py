"""Pipeline kill: `python -m pipeline.tokenize` killed with SIGKILL at random points, then rerun.

    .venv/bin/python -m benchmarks.reliability.pipeline_kill [--kills 5] [--work /tmp/replaymix-pipeline-kill]

One uninterrupted run (embedded Ray, one CPU) makes the reference dataset and times the job. Then, for
each kill, the same command on the same --out is started in its own session and the whole session
(driver, embedded Ray and its workers) is killed with SIGKILL at a random point of that duration.
After the kill `--out` must hold nothing or a complete dataset, never a partial one; the same command
is then rerun, and the result must be byte-identical (every file's sha256) to the reference. A kill
that landed after the commit leaves the finished dataset, which the rerun refuses to overwrite; then
that dataset itself is compared. Staging folders of killed runs must be gone after the rerun.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from benchmarks.reliability.harness import (
    REPO,
    build_datasets,
    code_root,
    folder_digest,
    head_commit,
    print_figures,
    tokenize_command,
    write_corpus,
)
from pipeline.dataset import MANIFEST_NAME, TokenDataset

LEAK_GRACE_SECONDS = 15.0


@dataclass
class PipelineKillResult:
    reference_seconds: float = 0.0
    reference_files: int = 0
    kills: int = 0
    killed_before_commit: int = 0
    killed_after_commit: int = 0
    partial_outputs: int = 0  # an --out left holding something that is not a complete dataset
    reruns_identical: int = 0
    reruns_different: list[str] = field(default_factory=list)
    stale_staging: int = 0
    leftover_processes: int = 0  # alive LEAK_GRACE_SECONDS after a kill (Ray daemons); reported, not fatal
    kill_points: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.kills > 0 and self.reruns_identical == self.kills and not self.reruns_different
                and self.partial_outputs == 0 and self.stale_staging == 0)

    def summary(self) -> str:
        return (
            f"pipeline kill: {self.kills} kill -9s ({self.killed_before_commit} before the commit, "
            f"{self.killed_after_commit} after), {self.reruns_identical}/{self.kills} reruns byte-identical to the "
            f"uninterrupted run ({self.reference_files} files), {self.partial_outputs} partial outputs, "
            f"{self.stale_staging} stale staging folders, {self.leftover_processes} processes alive "
            f"{LEAK_GRACE_SECONDS:.0f} s after a kill "
            f"-> {'OK' if self.ok else 'FAILED'}"
        )


def _session_processes(session: int) -> list[int]:
    """Live processes of a session we started (by session id, so nobody else's are touched)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    alive.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return alive


def run_and_kill(command: list[str], cwd: Path, after: float) -> int:
    """Start `command` in a new session, SIGKILL the session after `after` s; return processes left."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # Ray's daemons run in process groups of their own (same session) and are meant to exit when
    # their driver dies; whatever is still alive after a grace period has leaked.
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours by session id; killed so that the next run starts clean
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def run_pipeline_kill(work: Path, kills: int, seed: int = 0, code: Path = REPO, documents: int = 3000,
                      ray_address: str | None = None) -> PipelineKillResult:
    """With `ray_address` the jobs join that cluster (only the driver is killed); else each embeds its own."""
    work = Path(work)
    tokenizer = TokenDataset(build_datasets(work / "datasets")["old"]).tokenizer_path
    corpus = write_corpus(work / "corpus.jsonl", documents, documents)
    extra = ("--address", ray_address) if ray_address else ()
    reference, out = work / "reference", work / "out"
    result = PipelineKillResult()
    shutil.rmtree(reference, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(tokenize_command(corpus, tokenizer, reference, *extra), cwd=code, check=True, capture_output=True)
    result.reference_seconds = time.perf_counter() - started
    expected = folder_digest(reference)
    result.reference_files = len(expected)
    rng = random.Random(seed)
    for _ in tqdm(range(kills), desc="kill and rerun", unit="kill"):
        shutil.rmtree(out, ignore_errors=True)
        point = rng.uniform(0.05, 1.0) * result.reference_seconds
        result.kill_points.append(point)
        result.leftover_processes += run_and_kill(tokenize_command(corpus, tokenizer, out, *extra), code, point)
        result.kills += 1
        committed = (out / MANIFEST_NAME).exists()
        result.killed_after_commit += committed
        result.killed_before_commit += not committed
        result.partial_outputs += out.exists() and not committed
        rerun = subprocess.run(tokenize_command(corpus, tokenizer, out, *extra), cwd=code, capture_output=True, text=True)
        refused_existing = rerun.returncode == 2 and "already exists" in rerun.stderr
        if rerun.returncode != 0 and not (committed and refused_existing):
            result.reruns_different.append(f"kill at {point:.1f} s: rerun exited {rerun.returncode}: {rerun.stderr[-500:]}")
        elif folder_digest(out) != expected:
            differing = sorted(set(folder_digest(out).items()) ^ set(expected.items()))
            result.reruns_different.append(f"kill at {point:.1f} s: files differ: {differing[:4]}")
        else:
            result.reruns_identical += 1
        result.stale_staging += len(list(work.glob(f".{out.name}.staging-*")))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--documents", type=int, default=3000, help="documents per language in the corpus")
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-pipeline-kill"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-head", action="store_true", help="run the pipeline as committed at HEAD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    code = code_root(args.work, args.from_head)
    result = run_pipeline_kill(args.work, args.kills, args.seed, code, args.documents)
    print_figures(f"pipeline kill (code at {head_commit() if args.from_head else 'the working tree'})", {
        "uninterrupted run (s)": f"{result.reference_seconds:.1f}",
        "kill points (s)": ", ".join(f"{p:.1f}" for p in result.kill_points),
        "kills before / after the commit": f"{result.killed_before_commit} / {result.killed_after_commit}",
        "reruns byte-identical": f"{result.reruns_identical} / {result.kills} ({result.reference_files} files each)",
        "partial outputs after a kill": result.partial_outputs,
        "stale staging folders after a rerun": result.stale_staging,
        f"processes alive {LEAK_GRACE_SECONDS:.0f} s after a kill": result.leftover_processes,
    })
    for problem in result.reruns_different:
        print(f"  FAILURE {problem}")
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
