"""scripts/explain.py against a local stub of an OpenAI-compatible endpoint (http.server on
127.0.0.1, nothing else reached): the request shape, a retried failure, the stored explanation,
prompt and detection score, and a resumed run that asks only for what is missing."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("explain_script", ROOT / "scripts" / "explain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.RETRY_WAIT = 0.01
    return mod


class Stub:
    """Answers explain prompts with 'about <peak token>' per feature, and detection prompts with
    the texts whose marked token is the feature's own (so a right judge scores 1.0)."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[tuple[str, dict, dict]] = []
        self.fail = fail_first
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                if stub.fail > 0:
                    stub.fail -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                answer = stub.answer(body["messages"][0]["content"])
                out = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": answer}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(prompt: str) -> str:
        out = {}
        for block in (b.strip() for b in prompt.split("\n\n")[1:]):
            m = re.match(r"(feature \d+):", block)
            if not m:
                continue
            if "promotes:" in block:  # explain: name the first marked token
                out[m[1]] = "about " + re.search(r"<<(.*?)>>", block)[1]
            else:  # score: the texts whose marked token is the one the explanation names
                tok = re.search(r": about (\S+)", block)[1]
                out[m[1]] = [int(n) for n, t in re.findall(r"\n  (\d+)\. .*?<<(.*?)>>", block) if t == tok]
        return "```json\n" + json.dumps(out) + "\n```"


def _features(folder: Path, n: int = 5) -> Path:
    """n feature files, feature i firing on token 't{i}' in every context."""
    folder.mkdir(parents=True)
    for i in range(n):
        ex = [{"tokens": ["a", " b", f"t{i}", " c"], "tokens_acts_list": [0, 0, 1.0, 0], "train_token_ind": 2,
               "is_repeated_datapoint": False}] * 3  # fmt: skip
        doc = {"index": 100 + i, "label": f'"t{i}"', "top_logits": [f"o{i}"],
               "examples_quantiles": [{"quantile_name": "Top activations", "examples": ex},
                                      {"quantile_name": "Quantile 0-100% (random sample)", "examples": ex}]}  # fmt: skip
        (folder / f"{100 + i}.json").write_text(json.dumps(doc))
    return folder


def test_explain_batched_retried_scored_and_resumed(tmp_path, monkeypatch):
    script = _script()
    feats = _features(tmp_path / "features")
    stub = Stub(fail_first=1)
    try:
        counts = script.explain(tmp_path, stub.url, "stub-model", key="sk-test", batch=2, log=lambda m: None)
    finally:
        stub.server.shutdown()
    assert counts == {"features": 5, "explained": 5, "skipped": 0}
    # 3 batches (2, 2, 1 features) x (explain + score) = 6 answered requests, plus the failed one.
    assert len(stub.requests) == 7
    path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "stub-model" and body["messages"][0]["role"] == "user"
    assert stub.requests[1][2] == body  # the retry resent the same request
    assert (
        "feature 100:" in body["messages"][0]["content"] and "feature 101:" in body["messages"][0]["content"]
    )
    for i in range(5):
        e = json.loads((feats / f"{100 + i}.json").read_text())["explanation"]
        assert e["text"] == f"about t{i}" and e["model"] == "stub-model"
        assert e["score"] == 1.0  # the stub judges right: own texts in, others out
        assert f"feature {100 + i}:" in e["prompt"] and f"feature {100 + i}: about t{i}" in e["score_prompt"]

    # Resume: one explanation removed, one file of another model's; only those two are asked for.
    for i, edit in ((1, None), (3, "other-model")):
        doc = json.loads((feats / f"{100 + i}.json").read_text())
        if edit:
            doc["explanation"]["model"] = edit
        else:
            del doc["explanation"]
        (feats / f"{100 + i}.json").write_text(json.dumps(doc))
    stub = Stub()
    try:
        counts = script.explain(feats, stub.url, "stub-model", batch=8, log=lambda m: None)
    finally:
        stub.server.shutdown()
    assert counts == {"features": 5, "explained": 2, "skipped": 3} and len(stub.requests) == 2
    asked = stub.requests[0][2]["messages"][0]["content"]
    assert re.findall(r"(feature \d+):", asked) == ["feature 101", "feature 103"]
    assert "Authorization" not in stub.requests[0][1]


def test_endpoint_down_is_one_line_exit_2(tmp_path, capsys):
    _features(tmp_path / "features", 1)
    stub = Stub(fail_first=10)
    try:
        code = _script().main([str(tmp_path), "--endpoint", stub.url, "--model", "m", "--retries", "2"])
    finally:
        stub.server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "HTTP 503" in err[0] and len(stub.requests) == 3


def test_detection_score_hand_worked():
    s = _script()
    assert s.detection_score([1, 3], [1, 3], 4) == 1.0
    assert s.detection_score([1, 2], [1, 3], 4) == 0.5  # 1 right in, 4 right out; 2 and 3 wrong
    assert s.detection_score([], [1, 3], 4) == 0.5
    assert s.detection_score(["x", 2, 4], [1, 3], 4) == 0.0


@pytest.mark.parametrize("text", ['{"feature 1": "x"}', 'Sure! ```json\n{"feature 1": "x"}\n```', "no json"])
def test_answer_tolerates_text_around_the_json(text):
    assert _script()._answer(text) == ({} if text == "no json" else {"feature 1": "x"})
