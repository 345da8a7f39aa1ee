"""The README's recipe for a Ray cluster of one's own, run as written: a head started by its commands
(token authentication on, on ports of its own) and the tokenize job submitted by its commands, with the
job's `python` on the head's PATH a Python without the project's packages, as on a real cluster."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.dataset import TokenDataset
from service.launcher import free_port
from conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_block(marker: str) -> str:
    """The ```sh block after `<!-- marker -->` in the README."""
    return README.read_text().split(f"<!-- {marker} -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def substituted(block: str, replacements: dict[str, str]) -> str:
    """`block` with each placeholder replaced; each must be there, so the README cannot drift from the test."""
    for old, new in replacements.items():
        assert old in block, f"the README block no longer holds {old!r}:\n{block}"
        block = block.replace(old, new)
    return block


def cluster_environment(tmp_path: Path) -> dict[str, str]:
    """A machine of the README's reader: a home of its own (the token goes to ~/.ray/auth_token), Ray's CLI
    on PATH, and as `python` the interpreter this environment was made from, without the environment."""
    home, cluster_bin = tmp_path / "home", tmp_path / "cluster-bin"
    home.mkdir()
    cluster_bin.mkdir()
    (cluster_bin / "python").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAY_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PATH=f"{cluster_bin}:{Path(sys.executable).parent}:{env['PATH']}")
    return env


def stop_ray_head(head: subprocess.Popen, temp_dir: str) -> None:
    """End a `ray start --head --block` started in its own session: SIGTERM to its group, SIGKILL if it has
    not ended within a minute; then its temp dir goes."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def head_flags(dashboard: int, temp_dir: str) -> str:
    """`ray start --head` on ports of its own (other Rays on this machine hold the defaults), in the
    foreground so that its process group is this head alone (`ray stop` would stop every Ray here)."""
    ports = " ".join(f"--{flag}={free_port()}" for flag in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port"))
    return (f"ray start --head --block {ports} --dashboard-port={dashboard} --num-cpus=2 --temp-dir={temp_dir} "
            "--disable-usage-stats")


def wait_for_jobs(head: subprocess.Popen, env: dict[str, str], timeout_s: float = 180) -> None:
    """The head answers before its job agent takes jobs: submit a no-op until one is taken."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert head.poll() is None, "the Ray head exited while starting; see ray-head.log"
        probe = subprocess.run(["ray", "job", "submit", "--no-wait", "--", "true"], env=env, capture_output=True,
                               text=True, timeout=120)
        if probe.returncode == 0:
            return
        assert time.monotonic() < deadline, f"no Ray job agent after {timeout_s:.0f} s: {probe.stderr[-2000:]}"
        time.sleep(2)


def run_block(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-ec", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    print(result.stdout[-5000:], result.stderr[-5000:], sep="\n")
    return result


@pytest.mark.slow
def test_the_readme_cluster_recipe_runs_as_written(tmp_path, german_lines, english_model):
    shared = tmp_path / "shared"
    (shared / "tok").mkdir(parents=True)
    (shared / "data").mkdir()
    source = write_jsonl(shared / "data" / "de.jsonl", german_lines[:200])
    shutil.copyfile(english_model, shared / "tok" / "en+de.model")
    env = cluster_environment(tmp_path)
    dashboard = free_port()
    temp_dir = f"/tmp/rayreadme{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    head_script = substituted(readme_block("readme-ray-head"), {
        "ray start --head": head_flags(dashboard, temp_dir),
        "--dashboard-host 0.0.0.0": "--dashboard-host 127.0.0.1",  # a test exposes nothing
    })
    submit_script = substituted(readme_block("readme-ray-submit"), {
        "/shared/replaymix": str(REPO), "http://head:8265": f"http://127.0.0.1:{dashboard}", "/shared": str(shared)})
    client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}

    with open(tmp_path / "ray-head.log", "wb") as log:
        head = subprocess.Popen(["bash", "-ec", head_script], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_jobs(head, client_env)
        job = run_block(submit_script, env, tmp_path)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "tokenized 200 documents" in job.stdout
        assert f"output: {shared / 'datasets' / 'de'}\n" in job.stdout

        # The same job with a relative --out: refused in one line, before any work, and nothing written.
        relative = run_block(submit_script.replace(f"--out {shared}/datasets/de", "--out datasets/de2"), env, tmp_path)
        output = relative.stdout + relative.stderr
        assert relative.returncode != 0
        assert re.search(r"error: --out datasets/de2: relative path in Ray job raysubmit_\w+, whose working "
                         r"directory is Ray's temporary copy", output), output[-3000:]
        assert "give absolute paths on storage every node mounts" in output and "Traceback" not in output
    finally:
        stop_ray_head(head, temp_dir)

    local = subprocess.run([sys.executable, "-m", "pipeline.tokenize", "--input", str(source), "--tokenizer",
                            str(english_model), "--out", str(tmp_path / "local"), "--num-cpus", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    submitted = TokenDataset(shared / "datasets" / "de", verify="full")
    assert submitted.manifest["splits"] == TokenDataset(tmp_path / "local").manifest["splits"]


# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"google": "protobuf"}


def test_the_readme_uv_environment_holds_every_package_the_pipeline_imports():
    """The README's runtime_env for clusters without shared storage must install what pipeline/ imports
    (lazily too), besides Ray itself, which the cluster has."""
    listed = re.search(r"""'\{"uv": (\[.*?\])\}'""", README.read_text(), re.S).group(1)
    packages = {re.split(r"[<>=\[]", spec)[0] for spec in json.loads(listed.replace("\n  ", " "))}
    imported = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {DISTRIBUTIONS.get(name, name) for name in imported
                   if name not in sys.stdlib_module_names and name not in ("pipeline", "ray", "__future__")}
    assert third_party <= packages, f"missing from the README's uv list: {sorted(third_party - packages)}"
