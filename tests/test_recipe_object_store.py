"""A recipe whose output is an object store (issue 24): moto's S3 server on 127.0.0.1, the tiny random
Llama and corpora of tests/test_recipe.py, one update of a few steps.

The job works in a local working copy and the bucket is the output of record: the report, the lock and
the model folder land there, and a second job with the working copy wiped (another machine, a cleared
cache) fetches what it needs and trains nothing again, to the same result; a run left unfinished in the
store resumes there from its latest checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUCKET, s3_bucket
from tests.test_recipe import REPO, fails, workspace, write  # noqa: F401 - workspace: the module's fixture

PREFIX = "run"


def recipe_text(workspace: Path, work: Path, output: str = f"s3://{BUCKET}/{PREFIX}") -> str:
    data = workspace / "data"
    return f"""\
name: stored
model: hf:{workspace / 'models' / 'base'}
old: {{en: {data / 'en-sample.jsonl'}}}
updates:
  - {{name: de, new: {{de: {data / 'de.jsonl'}}}, replay: {{share: 0.25}}, steps: 4}}
data: {{seq_len: 32, global_batch: 8, micro_batch: 4}}
evaluation: {{every: 2, batches: 1}}
training: {{checkpoint_every: 2}}
compute: {{cpus: 2, threads: 1, work_dir: {work}}}
output: {output}
"""


def run_recipe(recipe: Path) -> subprocess.CompletedProcess:
    """`python -m recipe run` with this test's environment (the store's endpoint and credentials)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "recipe", "run", str(recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def objects(s3, prefix: str = PREFIX) -> dict[str, str]:
    """Every object under the prefix: {key relative to it: ETag}."""
    found, start = {}, f"{prefix}/" if prefix else ""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=start):
        found |= {item["Key"][len(start):]: item["ETag"] for item in page.get("Contents", [])}
    return found


def download(s3, prefix: str, target: Path) -> Path:
    for key in objects(s3):
        if key.startswith(prefix + "/"):
            (target / key).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, f"{PREFIX}/{key}", str(target / key))
    return target / prefix


@pytest.fixture(scope="module")
def s3(s3_server):
    """The bucket and the environment for the whole module: its tests share one job's output."""
    with pytest.MonkeyPatch.context() as patch, s3_bucket(s3_server, patch) as client:
        yield client


@pytest.fixture(scope="module")
def stored(workspace, s3, tmp_path_factory):
    """The recipe run once into s3://BUCKET/run: (recipe file, its working copy)."""
    root = tmp_path_factory.mktemp("stored")
    recipe = write(root / "stored.yaml", recipe_text(workspace, root / "work"))
    first = run_recipe(recipe)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    assert "de/train: uploaded" in first.stdout
    return recipe, root / "work"


def test_an_object_store_output_holds_the_results_and_a_wiped_working_copy_trains_nothing_again(stored, s3,
                                                                                                 tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, work = stored
    held = objects(s3)
    for key in ("report.md", "recipe.lock.json", "model/config.json", "model/model.safetensors",
                "steps/de__train.json", "runs/de/train/checkpoints/final.pt", "runs/de/train/metrics.jsonl",
                "service/de/train/mix_log.jsonl", "datasets/en.base/manifest.json"):
        assert key in held, f"{key} is not in the bucket: {sorted(held)}"
    assert not any(k.startswith("secrets/") for k in held)  # the service's tokens stay on the machine
    lock = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/recipe.lock.json")["Body"].read())
    assert lock["name"] == "stored" and lock["recipe"]["output"] == f"s3://{BUCKET}/{PREFIX}"
    model = download(s3, "model", tmp_path / "fetched")
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert len(tokenizer) == AutoModelForCausalLM.from_pretrained(model).get_input_embeddings().weight.shape[0]

    shutil.rmtree(work)  # another machine, or a cleared cache
    again = run_recipe(recipe)
    assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-3000:]
    assert "fetched from s3://" in again.stdout and "de/train: done, reused" in again.stdout
    assert "=== " not in again.stdout, again.stdout  # no step ran: the pipeline's and the run's reused
    after = objects(s3)
    for key, etag in held.items():  # the same weights, records, checkpoints and data; the report rewritten
        if not key.startswith(("report.md", "plots/", "recipe.lock.json", "store-index.json")):
            assert after.get(key) == etag, key
    assert (work / "model" / "model.safetensors").read_bytes() == \
        s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/model/model.safetensors")["Body"].read()


def test_a_run_left_unfinished_in_the_store_is_fetched_with_its_latest_checkpoint_to_resume(stored, s3, workspace,
                                                                                            tmp_path):
    from recipe.plan import make_plan
    from recipe.runner import Runner
    from recipe.schema import load_recipe

    # A copy of the output as a machine that died in the full run left it: no record, no final checkpoint.
    for key in objects(s3):
        if key not in ("steps/de__train.json", "runs/de/train/checkpoints/final.pt"):
            s3.copy_object(Bucket=BUCKET, Key=f"unfinished/{key}", CopySource=f"{BUCKET}/{PREFIX}/{key}")
    work = tmp_path / "elsewhere"
    recipe, name = load_recipe(write(tmp_path / "stored.yaml",
                                     recipe_text(workspace, work, f"s3://{BUCKET}/unfinished")))
    runner = Runner(make_plan(recipe, name))
    runner.fetch()
    run = runner.plan.runs["de"]
    assert (work / "steps" / "tokenize_de_(base_tokenizer).json").is_file()
    assert not runner.records.path(run).exists()
    assert (work / "datasets" / "de.base" / "manifest.json").is_file()
    assert (run.run_dir / "checkpoints" / "latest.pt").is_file() and (run.run_dir / "metrics.jsonl").is_file()
    assert (Path(run.service.state_dir) / "mix_log.jsonl").is_file()
    assert not (run.run_dir / "checkpoints" / "final.pt").exists()
    assert runner._resumed(run.trainer).resume  # the trainer goes on from it, as after a local kill


def test_an_unreachable_bucket_or_missing_credentials_is_one_error_naming_output(capsys, workspace, s3, tmp_path,
                                                                                    monkeypatch):
    work = tmp_path / "work"
    missing = fails(capsys, write(tmp_path / "a.yaml", recipe_text(workspace, work, "s3://no-such-bucket/run")))
    assert "output" in missing and "no-such-bucket" in missing and "does not exist" in missing
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    unsigned = fails(capsys, write(tmp_path / "b.yaml", recipe_text(workspace, work, f"s3://{BUCKET}/empty")))
    assert "output" in unsigned and "no AWS credentials" in unsigned
    assert not work.exists() and not any(k.startswith("empty/") for k in objects(s3, ""))  # nothing written


def test_a_store_holding_another_recipes_results_is_refused_by_its_lock(capsys, workspace, s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="taken/recipe.lock.json", Body=json.dumps({"name": "someone-else"}).encode())
    work = tmp_path / "work"
    taken = fails(capsys, write(tmp_path / "c.yaml", recipe_text(workspace, work, f"s3://{BUCKET}/taken")))
    assert taken.startswith("error: ") and "output" in taken and "another recipe ('someone-else'" in taken
    assert not work.exists() and objects(s3, "taken") == {"recipe.lock.json": s3.head_object(
        Bucket=BUCKET, Key="taken/recipe.lock.json")["ETag"]}
    # This recipe's results, made in a working copy elsewhere: continued only from the same path.
    s3.put_object(Bucket=BUCKET, Key="moved/recipe.lock.json",
                  Body=json.dumps({"name": "stored", "work_dir": "/elsewhere/work"}).encode())
    moved = fails(capsys, write(tmp_path / "d.yaml", recipe_text(workspace, work, f"s3://{BUCKET}/moved")))
    assert "compute.work_dir" in moved and "set compute.work_dir: /elsewhere/work" in moved
    assert not work.exists()


def test_a_training_runs_checkpoint_and_service_state_are_uploaded_while_it_trains(workspace, s3, tmp_path):
    """What lets another machine resume a run whose job died: each new checkpoint goes up as it is written."""
    import time

    from recipe.plan import make_plan
    from recipe.runner import Runner
    from recipe.schema import load_recipe

    recipe, name = load_recipe(write(tmp_path / "m.yaml", recipe_text(workspace, tmp_path / "work",
                                                                     f"s3://{BUCKET}/mirrored")))
    runner = Runner(make_plan(recipe, name))
    run = runner.plan.runs["de"]
    with runner._mirrored(run):  # as while its trainer trains: the test writes what the trainer and service would
        (Path(run.service.state_dir)).mkdir(parents=True)
        (Path(run.service.state_dir) / "mix_log.jsonl").write_text("{}\n")
        (run.run_dir / "checkpoints").mkdir(parents=True)
        (run.run_dir / "checkpoints" / "latest.pt").write_bytes(b"step 2")
        for _ in range(100):
            if "runs/de/train/checkpoints/latest.pt" in objects(s3, "mirrored"):
                break
            time.sleep(0.1)
    held = objects(s3, "mirrored")
    assert {"runs/de/train/checkpoints/latest.pt", "service/de/train/mix_log.jsonl"} <= set(held), held


def test_only_new_or_changed_files_are_sent_and_a_rebuilt_folder_is_mirrored_in_gcs(gcs, tmp_path):
    """The store rule itself, on the other store (fake-gcs-server): a file rewritten at the same size is
    sent again, an unchanged one is not, a mirrored folder loses what the working copy no longer holds."""
    from recipe.store import OutputStore

    work = tmp_path / "work"
    (work / "runs" / "a").mkdir(parents=True)
    (work / "runs" / "a" / "latest.pt").write_bytes(b"step 2")
    (work / "runs" / "a" / "metrics.jsonl").write_text("{}\n")
    (work / "secrets").mkdir()
    (work / "secrets" / "admin-token").write_text("not for the store")
    store = OutputStore(f"gs://{gcs}/out", work)
    store.check_reachable()
    assert store.push([work / "runs", work / "secrets"]) == (2, 9)
    assert store.push([work / "runs"]) == (0, 0)  # a rerun: nothing sent
    (work / "runs" / "a" / "latest.pt").write_bytes(b"step 4")  # the same size, other bytes
    (work / "runs" / "a" / "metrics.jsonl").unlink()
    assert store.push([work / "runs"], mirror=True) == (1, 6)  # one sent (and one deleted)
    assert set(OutputStore(f"gs://{gcs}/out", work).listing()) == {"runs/a/latest.pt"}
    elsewhere = OutputStore(f"gs://{gcs}/out", tmp_path / "elsewhere")
    assert elsewhere.differs("runs/a/latest.pt") and elsewhere.download(elsewhere.listing()) == (1, 6)
    assert (tmp_path / "elsewhere" / "runs" / "a" / "latest.pt").read_bytes() == b"step 4"
    assert not elsewhere.differs("runs/a/latest.pt")
