"""`train --push_to_hub`: offline it fails at once, before the probe, and leaves the folder as it was;
online it uploads the finished folder through huggingface_hub's real client, here to a small
Hub stand-in on 127.0.0.1 (``HF_ENDPOINT``) that records what the client sends."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import saved_workspace

NAMESPACE = "tester"
TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--r", "2", "--max_length", "32",
         "--eval_generate", "1", "--max_eval_samples", "4", "--probe_batches", "1", "--save_steps", "1",
         "--disable_tqdm", "true"]  # fmt: skip


class FakeHub(BaseHTTPRequestHandler):
    """Answers the calls an upload makes (create repo, validate the card's YAML, preupload, commit) and
    records them."""

    calls: list[tuple[str, str, bytes]] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.calls.append(("POST", self.path, body))
        host = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            name = json.loads(body)["name"]
            return self._reply({"url": f"{host}/{NAMESPACE}/{name.split('/')[-1]}"})
        if self.path == "/api/validate-yaml":  # the client checks README.md's metadata before committing
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})  # fmt: skip
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply({"commitUrl": f"{host}/{repo}/commit/abc123", "commitOid": "abc123"})
        return self._reply({"error": f"unexpected {self.path}"}, status=404)

    def do_GET(self):
        self.calls.append(("GET", self.path, b""))
        return self._reply({"error": f"unexpected {self.path}"}, status=404)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    saved_workspace(root, n_rows=16)
    return root


def _train(ws: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "aletheia_lora", "train", "--model", str(ws / "model"), "--data",
           str(ws / "data.jsonl"), "--output_dir", str(out), *TRAIN, *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def test_offline_push_fails_at_once_before_the_probe_and_leaves_the_folder_alone(workspace, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty folder, as a user might have made it
    started = time.perf_counter()
    done = _train(workspace, out, _env(HF_HUB_OFFLINE="1", HF_TOKEN="hf_fake"), "--push_to_hub", "true")
    assert done.returncode == 1, done.stderr
    assert "--push_to_hub: HF_HUB_OFFLINE=1 is set (offline mode)" in done.stderr
    assert "hf upload run " in done.stderr  # and what to do instead
    assert "Traceback" not in done.stderr and "probe" not in done.stdout + done.stderr
    assert list(out.iterdir()) == []  # nothing written: the same command works once online
    assert time.perf_counter() - started < 60  # imports only: no model load, no probe


def test_push_without_a_token_says_how_to_log_in(workspace, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = _env(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"))
        done = _train(workspace, tmp_path / "run", env, "--push_to_hub", "true")
    finally:
        server.shutdown()
    assert done.returncode == 1 and "no Hugging Face token; run `hf auth login`" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_push_uploads_adapter_card_record_and_plots_to_the_hub_repo(workspace, tmp_path):
    FakeHub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "my-adapter"
    try:
        env = _env(HF_ENDPOINT=endpoint, HF_TOKEN="hf_fake", HF_HOME=str(tmp_path / "hf"))
        done = _train(workspace, out, env, "--push_to_hub", "true", "--hub_private_repo", "true")
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert f"pushed to the Hub: {endpoint}/{NAMESPACE}/my-adapter/commit/abc123" in done.stdout

    create = [json.loads(b) for m, p, b in FakeHub.calls if p == "/api/repos/create"]
    assert create and create[0]["name"] == "my-adapter" and create[0]["visibility"] == "private"
    commits = [b for m, p, b in FakeHub.calls if p.startswith(f"/api/models/{NAMESPACE}/my-adapter/commit/")]
    assert len(commits) == 1  # one commit, at the end (the Trainer's own pushes are off)
    lines = [json.loads(line) for line in commits[0].decode().splitlines() if line]
    sent = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "aletheia.json", "layer_scores.png",
            "loss.png", "report.md"} <= set(sent), sorted(sent)  # fmt: skip
    assert not [p for p in sent if p.startswith(("checkpoint-", "merged/", "."))]
    assert sent["README.md"] == (out / "README.md").read_bytes()
    card = sent["README.md"].decode()
    assert f'adapter = "{NAMESPACE}/my-adapter"' in card  # the snippet loads the pushed repo
    assert json.loads(sent["aletheia.json"])["hub_model_id"] == f"{NAMESPACE}/my-adapter"
    validated = [json.loads(b)["content"] for m, p, b in FakeHub.calls if p == "/api/validate-yaml"]
    assert (
        validated and "library_name: peft" in validated[0]
    )  # the card's front matter went through the check
