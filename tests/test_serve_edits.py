"""Editing over HTTP (`suffix` on /v1/completions, /v1/edits) and the memory-aware limits on a request's passes."""

import json
import os
import resource
import subprocess
import sys
import time

import httpx
import pytest

import trimode
from tests.invariance import flat_cost
from tests.test_serve_api import ServerThread
from tests.test_serve_cli import free_port
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app

MODEL = "edits"
SORT = [{"role": "user", "content": "Sort: 7 3 9 1 4 2"}]


@pytest.fixture(scope="module")
def bundled():
    return trimode.load()


@pytest.fixture(scope="module")
def srv(bundled):
    with ServerThread(create_app(Engine(bundled, cost=flat_cost()), ServerConfig(MODEL))) as s:
        yield s


def post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json={"model": MODEL, **body}, timeout=60, **kw)


def test_suffix_is_infill_and_gives_what_the_api_gives(srv, bundled):
    prompt = bundled.tokenizer.apply_chat_template(SORT)
    for prefix, suffix, budget in (("1 2 ", " 4 7 9", 2), ("1 ", " 3 4 7 9", 4), ("", " 2 3 4 7 9", 3)):
        r = post(srv, "/v1/completions", {"prompt": prompt + prefix, "suffix": suffix, "max_tokens": budget})
        assert r.status_code == 200, r.text
        ref = bundled.infill(prompt + prefix, suffix, max_new_tokens=budget)
        assert r.json()["choices"][0]["text"] == ref.text
        assert r.json()["trimode"]["mode"] == "edit"
    # A text prompt cut after a space is healed as tm.infill heals it; the hole's window is a request field.
    r = post(srv, "/v1/completions", {"prompt": prompt + "1 2 ", "suffix": " 4 7 9", "max_tokens": 16,
                                      "hole_window": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == bundled.infill(prompt + "1 2 ", " 4 7 9", 16, hole_window=0).text
    r = post(srv, "/v1/completions", {"prompt": prompt + "1 2 ", "suffix": " 4 7 9", "hole_window": -1})
    assert r.status_code == 400 and "hole_window" in r.text


def test_revise_and_fill_routes(srv):
    r = post(srv, "/v1/edits", {"kind": "revise", "messages": SORT, "draft": "1 2 3 5 7 9"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "1 2 3 4 7 9" and choice["spans"] == [[6, 7]]
    r = post(srv, "/v1/edits", {"kind": "revise", "messages": SORT, "draft": "1 2 3 5 7 9", "spans": [[6, 7]]})
    assert r.json()["choices"][0]["text"][:6] == "1 2 3 " and r.json()["choices"][0]["text"][7:] == " 7 9"
    r = post(srv, "/v1/edits", {"kind": "fill", "template": "Sort: 3 1 2\n[[hole:2]] 2 3", "threshold": 0.5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("Sort: 3 1 2\n")
    assert len(r.json()["choices"][0]["spans"]) == 1


def test_edit_streams_provisional_states_then_the_result(srv):
    body = {"model": MODEL, "kind": "fill", "template": "Sort: 3 1 2\n[[hole:6]]", "stream": True,
            "provisional": True, "threshold": 1.0}
    with httpx.stream("POST", srv.url + "/v1/edits", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert any("provisional" in c for c in chunks[:-1])  # the block while it fills, one pass at a time
    assert chunks[-1]["choices"][0]["text"].startswith("Sort: 3 1 2\n")


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/edits", {"kind": "revise", "draft": "1 2 3", "spans": [[0, 2], [1, 3]]}, "overlap"),
    ("/v1/edits", {"kind": "revise", "draft": "1 2 3", "spans": [[2, 9]]}, "out of range"),
    ("/v1/edits", {"kind": "revise", "draft": "1 2 3", "spans": [[2]]}, "ranges"),
    ("/v1/edits", {"kind": "revise"}, "needs a draft"),
    ("/v1/edits", {"kind": "fill", "template": "no holes"}, "no hole"),
    ("/v1/edits", {"kind": "fill", "template": "x [[hole:9999]]"}, "context length"),
    ("/v1/edits", {"kind": "fill", "template": "[[hole:3]] y"}, "needs some text before"),
    ("/v1/edits", {"kind": "rewrite", "draft": "x"}, "kind"),
    ("/v1/edits", {"kind": "revise", "draft": "x", "rounds": "3"}, "rounds"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 4, "mode": "ar"}, "leave mode out"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 99999}, "context"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 4, "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "mode": "quadratic_spec", "block_length": 300},
     "--max-block-length"),
])
def test_bad_edits_and_blocks_are_400s(srv, path, body, needle):
    r = post(srv, path, body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_a_checkpoint_without_a_mask_token_refuses_edits(tmp_path):
    from tests.test_serve_api import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "nomask")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mask_token_id"] = -1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tm = trimode.load(ckpt)
    with ServerThread(create_app(Engine(tm, cost=flat_cost()), ServerConfig("m"))) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "ab", "suffix": "c", "max_tokens": 3})
        assert r.status_code == 400 and "no mask token" in r.json()["error"]["message"]


def _capped(limit_bytes: int):
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return cap


def test_a_request_that_can_never_fit_is_a_400_under_a_memory_cap(tmp_path):
    """The server runs with its address space capped (a regression allocates past it and fails, not swaps): a
    quadratic pass of block 300 (90,300 tokens) that the request could use is refused before it runs, naming the
    knob and the limit; blocks longer than a request can use run at the request's length."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "trimode.cli", "serve", "--port", str(port), "--log-level",
                             "warning", "--max-block-length", "1024"], cwd=tmp_path, stdout=log, stderr=log,
                            preexec_fn=_capped(5 << 30), env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start: " + (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        body = {"model": "trimode-default", "prompt": "hello", "max_tokens": 4}
        t0 = time.time()  # the request that once grew a server to 23 GB: its block is cut to what it can use
        r = httpx.post(url + "/v1/completions", json={**body, "mode": "quadratic_spec", "block_length": 300},
                       timeout=60)
        assert r.status_code == 200 and r.json()["trimode"]["knobs"]["block_length"] == 4, r.text
        assert time.time() - t0 < 5
        t0 = time.time()
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 400, "mode": "quadratic_spec",
                                                      "block_length": 300}, timeout=60)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "block_length" in message and "max_pass_bytes" in message
        assert time.time() - t0 < 5
        t0 = time.time()
        r = httpx.post(url + "/v1/completions", json={**body, "mode": "diffusion", "block_length": 1024}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["trimode"]["knobs"]["block_length"] == 4  # no block longer than the request can use
        assert r.json()["trimode"]["forward_passes"] <= 6 and time.time() - t0 < 10
        assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
    finally:
        proc.kill()
        proc.wait(timeout=60)
        log.close()
