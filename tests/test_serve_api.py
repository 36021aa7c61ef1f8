"""The JSON API of ``lmedit serve`` over HTTP, against a real uvicorn server on a loopback socket.

Most tests serve a tiny random Llama with the real SmolLM2 tokenizer; one ``real`` test serves Gemma 3 270M.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
import zipfile

import pytest
import torch

pytest.importorskip("fastapi", reason="lmedit serve needs fastapi (pip install fastapi uvicorn)")
uvicorn = pytest.importorskip("uvicorn", reason="lmedit serve needs uvicorn (pip install fastapi uvicorn)")

import lmedit  # noqa: E402
from lmedit.core.delta import fingerprint  # noqa: E402
from lmedit.errors import ConfigError  # noqa: E402
from lmedit.serve import ServerState, create_app, resolve_token  # noqa: E402
from tiny_models import tiny_loaded  # noqa: E402

PROMPT_A = "The Eiffel Tower is located in the city of"
PROMPT_B = "The Colosseum is located in the city of"
# strong enough that an FT-M edit changes the tiny model's greedy continuation
STRONG = {"lr": 0.05, "steps": 20}


class LiveServer:
    """uvicorn serving ``app`` in a thread on a socket bound to ``host`` (port chosen by the OS)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def request(
        self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None
    ):
        """(status, parsed JSON or bytes, headers) of one request over a fresh connection to 127.0.0.1."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        if resp.getheader("content-type", "").startswith("application/json"):
            payload = json.loads(payload)
        return resp.status, payload, dict(resp.getheaders())

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body=body, **kw)


def fingerprints(model) -> dict[str, str]:
    return {n: fingerprint(p) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def tiny(smol_tok):
    return tiny_loaded("llama", smol_tok)


@pytest.fixture(scope="module")
def base_prints(tiny):
    return fingerprints(tiny.model)


@pytest.fixture
def server(tiny, base_prints):
    state = ServerState(tiny)
    srv = LiveServer(create_app(state, max_upload_bytes=4 * 1024 * 1024))
    srv.state = state
    yield srv
    srv.close()
    state.session.reset()
    assert fingerprints(tiny.model) == base_prints, "a test left the shared tiny model edited"


def edit_body(prompt=PROMPT_A, subject="Eiffel Tower", target=" Rome", **kw) -> dict:
    body = {"prompt": prompt, "subject": subject, "target_new": target, "hparams": dict(STRONG)}
    body.update(kw)
    return body


def wait_job(srv: LiveServer, job_id: str) -> dict:
    deadline = time.time() + 300
    while True:
        status, view, _ = srv.get(f"/api/jobs/{job_id}?wait=5")
        assert status == 200, view
        if view["status"] in ("done", "failed"):
            return view
        assert time.time() < deadline, f"job {job_id} did not finish: {view}"


# ---------------------------------------------------------------------- reads
def test_info_page_and_openapi(server):
    status, info, _ = server.get("/api/info")
    assert status == 200
    names = [m["name"] for m in info["methods"]]
    assert names == lmedit.list_methods() and "ft-m" in names
    ftm = next(m for m in info["methods"] if m["name"] == "ft-m")
    hps = {h["name"]: h for h in ftm["hyperparameters"]}
    assert hps["lr"]["default"] == 5e-4 and hps["lr"]["help"]
    assert "progress" not in hps
    assert info["model"]["n_layers"] == 4 and info["token_required"] is False
    assert info["trace_available"] is (lmedit.serve.state.trace_function() is not None)

    status, page, headers = server.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"lmedit playground" in page and b'id="edit-apply"' in page

    status, schema, _ = server.get("/openapi.json")
    assert status == 200
    for path in (
        "/api/generate",
        "/api/score",
        "/api/edit",
        "/api/undo",
        "/api/history",
        "/api/patches",
        "/api/patches/{edit_id}",
        "/api/jobs/{job_id}",
        "/api/trace",
        "/api/reset",
        "/api/info",
    ):
        assert path in schema["paths"], path
    edit_schema = schema["components"]["schemas"]["EditBody"]
    assert edit_schema["properties"]["prompt"]["maxLength"] == 2000


def test_generate_matches_library_and_top5(server, tiny):
    status, out, _ = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 6})
    assert status == 200, out
    assert out["continuation"] == lmedit.greedy_generate(tiny, [PROMPT_A], max_new_tokens=6)[0]
    probs = [t["prob"] for t in out["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    ids = tiny.tokenizer(PROMPT_A, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny.model(ids).logits[0, -1]
    expect = torch.softmax(logits.float(), -1).topk(5)
    assert [t["id"] for t in out["top"]] == expect.indices.tolist()
    assert probs == pytest.approx(expect.values.tolist(), rel=1e-4)
    assert out["history"] == [] and out["version"] == 0


def test_score_is_teacher_forced_logprob(server, tiny):
    status, out, _ = server.post("/api/score", {"prompt": PROMPT_A, "targets": [" Paris", " Rome"]})
    assert status == 200, out
    ref = lmedit.score_pairs(tiny, [PROMPT_A, PROMPT_A], [" Paris", " Rome"])
    assert out["scoring"] == "teacher-forced"
    for got, want in zip(out["scores"], ref):
        assert got["logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
        assert got["accuracy"] == want.accuracy


# ---------------------------------------------------------------------- edit / undo
def test_edit_changes_model_and_undo_restores_bit_exact(server, tiny, base_prints):
    before = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 8})[1]["continuation"]
    body = edit_body(
        target_true=" Paris",
        paraphrases=["The Eiffel Tower can be found in the city of"],
        unrelated=["The capital of Japan is", PROMPT_B],
        max_new_tokens=8,
        wait=True,
    )
    status, job, _ = server.post("/api/edit", body)
    assert status == 200, job
    result = job["result"]
    kinds = [p["kind"] for p in result["probes"]]
    assert kinds == ["edit", "paraphrase", "unrelated", "unrelated"]
    edit_row = result["probes"][0]
    assert edit_row["before"] == before and edit_row["after"] != before and edit_row["changed"]
    assert edit_row["after"].startswith(" Rome"), edit_row
    metrics = {m["metric"]: m for m in result["metrics"]}
    assert set(metrics) == {"reliability", "P(target_new)", "P(target_true)", "generalization", "locality"}
    assert all(m["scoring"] == "teacher-forced" for m in metrics.values())
    assert (
        metrics["reliability"]["after"] == 1.0
        and metrics["P(target_new)"]["after"] > metrics["P(target_new)"]["before"]
    )
    assert (
        metrics["locality"]["n"] == 2 and metrics["locality"]["before"] >= metrics["locality"]["after"] - 1e-9
    )
    # the served model really is edited, and the page's view of it agrees with the edit's "after"
    after = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 8})[1]
    assert after["continuation"] == edit_row["after"] and after["history"] == [result["edit"]["id"]]
    assert fingerprints(tiny.model) != base_prints
    status, hist, _ = server.get("/api/history")
    assert [e["id"] for e in hist["edits"]] == [result["edit"]["id"]]
    assert hist["edits"][0]["requests"][0]["target_new"] == " Rome"

    status, undo, _ = server.post("/api/undo", {"edit_id": result["edit"]["id"], "wait": True})
    assert status == 200, undo
    assert fingerprints(tiny.model) == base_prints
    assert (
        server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 8})[1]["continuation"] == before
    )
    assert server.get("/api/history")[1]["edits"] == []


def test_queued_edits_report_position_and_apply_in_order(server):
    targets = [" Rome", " Berlin", " Madrid"]
    jobs = []
    for t in targets:
        status, view, headers = server.post("/api/edit", edit_body(target=t))
        assert status == 202, view
        assert headers["location"] == f"/api/jobs/{view['job']}"
        jobs.append(view)
    # each job reports how many are ahead of it (the first may already run)
    assert [j["position"] for j in jobs] == [0, 1, 2]
    views = [wait_job(server, j["job"]) for j in jobs]
    assert [v["status"] for v in views] == ["done"] * 3, views
    hist = server.get("/api/history")[1]["edits"]
    assert [e["requests"][0]["target_new"] for e in hist] == targets
    assert [e["id"] for e in hist] == sorted(e["id"] for e in hist)


def test_concurrent_generate_never_sees_a_torn_edit(server):
    """Generations running while edits are applied match the output of exactly one consistent state."""
    seen: list[tuple[tuple[int, ...], str]] = []
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            status, out, _ = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 5})
            if status != 200:
                errors.append(str(out))
                return
            seen.append((tuple(out["history"]), out["continuation"]))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    jobs = [server.post("/api/edit", edit_body(target=t))[1]["job"] for t in (" Rome", " Berlin")]
    views = [wait_job(server, j) for j in jobs]
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [v["status"] for v in views] == ["done", "done"]
    ids = [v["result"]["edit"]["id"] for v in views]
    # reference output of every state, computed serially afterwards
    reference = {}
    reference[tuple(ids)] = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 5})[1][
        "continuation"
    ]
    assert server.post("/api/undo", {"edit_id": ids[1], "wait": True})[0] == 200
    reference[(ids[0],)] = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 5})[1][
        "continuation"
    ]
    assert server.post("/api/undo", {"edit_id": ids[0], "wait": True})[0] == 200
    reference[()] = server.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 5})[1]["continuation"]
    assert len(set(reference.values())) == 3, (
        reference
    )  # each state answers differently, so tearing would show
    assert len(seen) >= 3
    states = {s for s, _ in seen}
    assert tuple(ids) in states  # the readers kept running across the edits
    assert states <= set(reference), states  # only whole states, in edit order
    for state, text in seen:
        assert text == reference[state], (state, text, reference)


def test_undo_an_earlier_edit_reapplies_later_ones(server, tiny, base_prints):
    l0 = "model.layers.0.mlp.down_proj.weight"
    l2 = "model.layers.2.mlp.down_proj.weight"
    a = server.post("/api/edit", edit_body(target=" Rome", hparams=dict(STRONG, layers=[0]), wait=True))[1]
    b = server.post(
        "/api/edit", edit_body(PROMPT_B, "Colosseum", " Paris", hparams=dict(STRONG, layers=[2]), wait=True)
    )[1]
    ida, idb = a["result"]["edit"]["id"], b["result"]["edit"]["id"]
    with_b = fingerprint(tiny.model.get_parameter(l2))
    status, out, _ = server.post("/api/undo", {"edit_id": ida, "wait": True})
    assert status == 200, out
    assert out["result"]["reapplied"] == [idb] and out["result"]["rebased"] == []
    assert fingerprint(tiny.model.get_parameter(l0)) == base_prints[l0]  # edit A gone, bit for bit
    assert fingerprint(tiny.model.get_parameter(l2)) == with_b  # edit B still there
    assert [e["id"] for e in server.get("/api/history")[1]["edits"]] == [idb]


def test_undo_conflicting_earlier_edit_needs_rebase_and_is_atomic(server, tiny):
    c = server.post("/api/edit", edit_body(target=" Rome", wait=True))[1]["result"]["edit"]["id"]
    d = server.post("/api/edit", edit_body(PROMPT_B, "Colosseum", " Paris", wait=True))[1]["result"]["edit"][
        "id"
    ]
    prints = fingerprints(tiny.model)
    version = server.get("/api/history")[1]["version"]
    status, err, _ = server.post("/api/undo", {"edit_id": c, "wait": True})
    assert status == 409, err
    assert "rebase" in err["error"]["message"] and f"#{d}" in err["error"]["message"]
    assert fingerprints(tiny.model) == prints  # rolled back exactly
    hist = server.get("/api/history")[1]
    assert [e["id"] for e in hist["edits"]] == [c, d] and hist["version"] == version
    status, out, _ = server.post("/api/undo", {"edit_id": c, "rebase": True, "wait": True})
    assert status == 200, out
    assert out["result"]["rebased"] == [d]
    hist = server.get("/api/history")[1]["edits"]
    assert [(e["id"], e["rebased"]) for e in hist] == [(d, True)]


def test_failed_edit_leaves_session_unchanged(server, tiny, base_prints):
    # an update too small to change float32 weights: the session's check refuses it and restores the model
    body = edit_body(hparams={"lr": 1e-30, "steps": 1}, wait=True)
    status, err, _ = server.post("/api/edit", body)
    assert status == 422, err
    assert err["error"]["type"] == "EditFailedError" and "restored" in err["error"]["message"]
    assert fingerprints(tiny.model) == base_prints
    hist = server.get("/api/history")[1]
    assert hist == {"version": 0, "edits": []}
    # the same failure seen through the async job API
    status, view, _ = server.post("/api/edit", dict(body, wait=False))
    view = wait_job(server, view["job"])
    assert view["status"] == "failed" and view["error"]["status"] == 422


def test_edit_failing_after_apply_is_rolled_back(server, tiny, base_prints, monkeypatch):
    calls = []
    real = server.state._probe_outputs

    def flaky(probes, max_new_tokens):
        calls.append(1)
        if len(calls) == 2:  # the "after" generation, with the edit applied
            raise RuntimeError("boom")
        return real(probes, max_new_tokens)

    monkeypatch.setattr(server.state, "_probe_outputs", flaky)
    status, err, _ = server.post("/api/edit", edit_body(wait=True))
    assert status == 500 and "boom" in err["error"]["message"]
    assert fingerprints(tiny.model) == base_prints
    assert server.get("/api/history")[1] == {"version": 0, "edits": []}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"subject": "Eiffel Tower", "target_new": " Rome"}, "prompt"),
        (edit_body(extra=1), "extra"),
        (edit_body(prompt=5), "prompt"),
        (edit_body(prompt="x" * 2001), "prompt"),
        (edit_body(paraphrases=["p"] * 9), "paraphrases"),
        (edit_body(max_new_tokens=0), "max_new_tokens"),
        (edit_body(hparams={"lr": {"nested": 1}}), "hparams"),
        (edit_body(subject="Big Ben"), "subject"),
        (edit_body(method="nope"), "method"),
        (edit_body(hparams={"learning_rate": 0.1}), "learning_rate"),
        (edit_body(hparams={"lr": -1.0}), "lr"),
        (edit_body(hparams={"layers": [99]}), "layers"),
    ],
)
def test_bad_edit_bodies_are_refused_with_422(server, body, field):
    status, err, _ = server.post("/api/edit", dict(body, wait=True))
    assert status == 422, err
    assert field in err["error"]["message"], err
    assert server.get("/api/history")[1]["edits"] == []


def test_bad_transport_is_refused(server):
    # not JSON
    status, err, _ = server.post("/api/generate", raw=b"prompt=x", headers={"Content-Type": "text/plain"})
    assert status == 415 and err["error"]["type"] == "unsupported_media_type"
    # malformed JSON
    status, err, _ = server.post("/api/generate", raw=b"{", headers={"Content-Type": "application/json"})
    assert status == 422
    # too large, judged from Content-Length
    big = json.dumps({"prompt": "x" * 70_000}).encode()
    status, err, _ = server.post("/api/generate", raw=big, headers={"Content-Type": "application/json"})
    assert status == 413
    # chunked JSON (no Content-Length)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/api/generate",
        body=iter([b'{"prompt": "hi"}']),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    assert conn.getresponse().status == 411
    conn.close()
    # other field errors
    assert server.post("/api/generate", {"prompt": ""})[0] == 422
    assert server.post("/api/generate", {"prompt": "hi", "max_new_tokens": 65})[0] == 422
    assert server.post("/api/score", {"prompt": "hi", "targets": []})[0] == 422
    assert server.post("/api/undo", {"edit_id": 0})[0] == 422
    status, err, _ = server.post("/api/undo", {"edit_id": 12345, "wait": True})
    assert status == 404 and "12345" in err["error"]["message"]
    assert server.get("/api/patches/12345")[0] == 404
    assert server.get("/api/jobs/nope")[0] == 404
    # a foreign Host header is refused on a loopback bind (DNS rebinding)
    assert server.get("/api/info", headers={"Host": "evil.example"})[0] == 400


def test_trace_endpoint(server, tiny):
    body = {"prompt": PROMPT_A, "subject": "Eiffel Tower", "kind": "mlp", "samples": 2}
    status, out, _ = server.post("/api/trace", body)
    if lmedit.serve.state.trace_function() is None:
        assert status == 501 and "causal_trace" in out["error"]["message"]
        return
    assert status == 200, out
    n_tokens = len(tiny.tokenizer(PROMPT_A)["input_ids"])
    grid = out["scores"]["mlp"]
    assert out["kind"] == "mlp" and len(grid) == 4 and all(len(row) == n_tokens for row in grid)
    assert len(out["tokens"]) == n_tokens and out["subject_range"][1] > out["subject_range"][0]
    assert all(0.0 <= v <= 1.0 for row in grid for v in row if v is not None)
    assert server.post("/api/trace", dict(body, kind="nope"))[0] == 422
    assert server.post("/api/trace", dict(body, samples=11))[0] == 422
    status, err, _ = server.post("/api/trace", dict(body, subject="Big Ben"))
    assert status == 422, err


# ---------------------------------------------------------------------- patches
def test_patch_download_and_upload_verified_against_base(server, tiny, base_prints):
    job = server.post("/api/edit", edit_body(wait=True))[1]
    edit_id = job["result"]["edit"]["id"]
    edited = fingerprints(tiny.model)
    status, data, headers = server.get(f"/api/patches/{edit_id}")
    assert status == 200 and headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert sorted(n.split("/")[-1] for n in names) == ["patch.json", "patch.safetensors"]

    # on top of the edited model the patch does not match its base: refused, nothing changes
    zh = {"Content-Type": "application/zip"}
    status, err, _ = server.post("/api/patches?wait=true", raw=data, headers=zh)
    assert status == 409 and "fingerprint" in err["error"]["message"], err
    assert fingerprints(tiny.model) == edited

    assert server.post("/api/undo", {"edit_id": edit_id, "wait": True})[0] == 200
    status, out, _ = server.post("/api/patches?wait=true", raw=data, headers=zh)
    assert status == 200, out
    assert out["result"]["edit"]["source"] == "upload"
    assert fingerprints(tiny.model) == edited  # the uploaded patch reproduces the edit exactly
    hist = server.get("/api/history")[1]["edits"]
    assert [e["source"] for e in hist] == ["upload"] and hist[0]["id"] != edit_id


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def test_bad_uploads_are_refused(server, base_prints, tiny):
    zh = {"Content-Type": "application/zip"}
    assert server.post("/api/patches", raw=b"not a zip", headers=zh)[0] == 400
    assert server.post("/api/patches", raw=b"", headers=zh)[0] == 400
    status, err, _ = server.post("/api/patches", raw=_zip({"../../etc/passwd": b"x"}), headers=zh)
    assert status == 400 and "unexpected file" in err["error"]["message"]
    status, err, _ = server.post("/api/patches", raw=_zip({"patch.json": b"{}"}), headers=zh)
    assert status == 400 and "patch.safetensors" in err["error"]["message"]
    status, err, _ = server.post(
        "/api/patches", raw=_zip({"patch.json": b"{", "patch.safetensors": b"x"}), headers=zh
    )
    assert status == 400 and "invalid patch" in err["error"]["message"]
    # zip bomb: small archive, large content
    status, err, _ = server.post(
        "/api/patches", raw=_zip({"patch.json": b"{}", "patch.safetensors": b"\0" * (17 * 2**20)}), headers=zh
    )
    assert status == 413
    # form posts (what a foreign web page can send without a preflight) are refused
    assert server.post("/api/patches", raw=b"x", headers={"Content-Type": "multipart/form-data"})[0] == 415
    assert fingerprints(tiny.model) == base_prints


def test_oversize_upload_refused_without_reading_it(server):
    # declared size over the cap: answered before the body is sent
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/api/patches")
    conn.putheader("Content-Type", "application/zip")
    conn.putheader("Content-Length", str(10 * 2**30))
    conn.endheaders()
    conn.send(b"PK")  # 2 bytes of a declared 10 GiB
    resp = conn.getresponse()
    assert resp.status == 413 and b"at most" in resp.read()
    conn.close()
    # chunked upload: cut off once the stream passes the cap
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"\0" * 2**20 for _ in range(5))
    try:
        conn.request(
            "POST",
            "/api/patches",
            body=chunks,
            headers={"Content-Type": "application/zip"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and b"exceeds" in resp.read()
    except (BrokenPipeError, ConnectionResetError):  # the server closed the connection on the oversize stream
        pass
    conn.close()
    assert server.get("/api/history")[1]["edits"] == []


# ---------------------------------------------------------------------- token
def test_token_config_rules(monkeypatch):
    monkeypatch.delenv("LMEDIT_TOKEN", raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert resolve_token(host) is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(ConfigError, match="requires a token"):
            resolve_token(host)
    assert resolve_token("0.0.0.0", "s3cret-token") == "s3cret-token"
    with pytest.raises(ConfigError, match="8 characters"):
        resolve_token("0.0.0.0", "short")
    monkeypatch.setenv("LMEDIT_TOKEN", "from-the-env")
    assert resolve_token("0.0.0.0") == "from-the-env"


def test_token_enforced_when_bound_to_non_loopback(tiny, base_prints, monkeypatch):
    monkeypatch.delenv("LMEDIT_TOKEN", raising=False)
    token = resolve_token("0.0.0.0", "t0ken-for-test")
    state = ServerState(tiny)
    srv = LiveServer(create_app(state, token=token, host="0.0.0.0"), host="0.0.0.0")
    try:
        assert srv.get("/api/info")[1]["token_required"] is True
        # reads are open
        assert srv.post("/api/generate", {"prompt": PROMPT_A, "max_new_tokens": 2})[0] == 200
        assert srv.get("/api/history")[0] == 200
        # every state change needs the token
        for path, body in (
            ("/api/edit", edit_body(wait=True)),
            ("/api/undo", {"edit_id": 1}),
            ("/api/reset", {}),
        ):
            status, err, _ = srv.post(path, body)
            assert status == 401 and "token" in err["error"]["message"], (path, err)
            assert srv.post(path, body, headers={"Authorization": "Bearer wrong-token"})[0] == 401
        assert srv.post("/api/patches", raw=b"PK", headers={"Content-Type": "application/zip"})[0] == 401
        assert fingerprints(tiny.model) == base_prints
        status, out, _ = srv.post(
            "/api/edit", edit_body(wait=True), headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 200, out
        status, out, _ = srv.post("/api/reset", {"wait": True}, headers={"X-Lmedit-Token": token})
        assert status == 200 and out["result"]["undone"] == [1]
    finally:
        srv.close()
        state.session.reset()
    assert fingerprints(tiny.model) == base_prints


# ---------------------------------------------------------------------- real model
@pytest.mark.real
def test_real_model_edit_and_undo_through_the_api(gemma):
    state = ServerState(gemma)
    srv = LiveServer(create_app(state))
    try:
        gen = {"prompt": PROMPT_A, "max_new_tokens": 8}
        before = srv.post("/api/generate", gen)[1]
        assert "Paris" in before["continuation"], before
        status, out, _ = srv.post(
            "/api/edit", edit_body(hparams={}, target_true=" Paris", max_new_tokens=8, wait=True)
        )
        assert status == 200, out
        after = srv.post("/api/generate", gen)[1]
        assert (
            "Rome" in after["continuation"] and after["continuation"] == out["result"]["probes"][0]["after"]
        )
        assert after["top"][0]["token"].strip() == "Rome"
        assert srv.post("/api/undo", {"edit_id": out["result"]["edit"]["id"], "wait": True})[0] == 200
        assert srv.post("/api/generate", gen)[1]["continuation"] == before["continuation"]
    finally:
        srv.close()
        state.session.reset()
