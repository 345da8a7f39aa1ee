"""The API described for a client in another language: offline docs, the OpenAPI document, the README client."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_service import READ_TOKEN, ServiceProcess, free_port, service_args

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def service(tmp_path, english_lines, english_model, token_dataset_factory):
    datasets = {"old": token_dataset_factory("old", english_lines[:80], english_model).root,
                "new": token_dataset_factory("new", english_lines[80:200], english_model).root}
    proc = ServiceProcess(service_args(datasets, tmp_path / "state", None, "old=0.25,new=0.75"), free_port())
    yield proc.start()
    proc.stop()


def test_docs_load_without_a_cdn_and_are_counted_by_route(service):
    for page in ("/docs", "/redoc"):
        html = httpx.get(service.url + page).text
        assert not re.search(r"https?://(cdn|unpkg|fastapi\.tiangolo)", html), page
        for asset in re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', html):
            assert httpx.get(service.url + asset).status_code == 200, asset
    assert httpx.get(service.url + "/openapi.json").status_code == 200
    metrics = httpx.get(service.url + "/metrics").text
    assert 'route="/docs"' in metrics and 'route="/openapi.json"' in metrics and 'route="unmatched"' not in metrics


def test_openapi_documents_every_endpoint_its_errors_and_the_binary_layout(service):
    spec = httpx.get(service.url + "/openapi.json").json()
    assert "36+M+R  R * L * width    tokens" in spec["info"]["description"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation.get("description"), f"{method.upper()} {path} has no description"
    batch = spec["paths"]["/v1/batches/{step}"]["get"]["responses"]
    assert set(batch) >= {"200", "401", "403", "409", "422"}
    assert batch["200"]["content"]["application/x-replaymix-batch"]["schema"]["format"] == "binary"
    assert set(spec["paths"]["/v1/mix"]["put"]["responses"]) >= {"200", "401", "403", "409", "422"}
    assert "404" in spec["paths"]["/v1/mix/stages/{start_step}"]["delete"]["responses"]


def test_the_readme_client_decodes_a_batch_from_the_documented_layout(service, tmp_path):
    block = README.read_text().split("<!-- readme-client -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    (tmp_path / "read.token").write_text(READ_TOKEN)
    script = block.replace("http://127.0.0.1:8000", service.url)
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    batch = httpx.get(f"{service.url}/v1/batches/0", headers={"Authorization": f"Bearer {READ_TOKEN}",
                                                              "Accept": "application/json"}).json()
    names = [batch["dataset_names"][s] for s in batch["sources"]]
    assert out.stdout.strip() == f"0 {names} {tuple(batch['tokens'][0])}"
