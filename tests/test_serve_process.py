"""`trimode serve` with the engine in its own processes: a real server subprocess, real clients, a real kill -9.

An engine process that dies mid-load must not hang a client: every request in flight ends with an answer or a
clear error (503 JSON, or an SSE error event), /health turns 503, and then, per --on-engine-death, the engine is
restarted (later requests are answered) or the server exits with status 75. An engine process that lives but
stops answering (SIGSTOP) is killed after --engine-stall-timeout and handled the same way. A client that stops
reading must not slow anyone else down. With several API servers, /metrics adds up every one of them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.test_serve_api import build_checkpoint
from tests.test_serve_cli import Served

MODEL = "tiny-ckpt"
AUTO = '{"modes": ["ar"], "smaller_blocks": false}'  # a short start-up measurement


def start(tmp_path, *args: str) -> Served:
    ckpt = build_checkpoint(tmp_path / MODEL)
    srv = Served(["--model", str(ckpt), "--log-level", "warning", "--auto-config", AUTO, *args], cwd=tmp_path)
    assert srv.wait_ready(), srv.stop()[1]
    return srv


def one_request(url: str, stream: bool, max_tokens: int = 120) -> tuple[str, str]:
    """("ok", text) for a complete answer, ("error", what) for a clear error; anything else fails the test."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": stream, "mode": "ar"}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            error = r.json()["error"]
            assert r.status_code == 503 and error["code"] == "engine_stopped", (r.status_code, error)
            return "error", error["message"]
        if not stream:
            r.read()
            return "ok", r.json()["choices"][0]["text"]
        text, done = "", False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                assert chunk["error"]["code"] == "engine_stopped", chunk
                return "error", chunk["error"]["message"]
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
        assert done, "the stream ended without [DONE] or an error event"
        return "ok", text


def load(url: str, clients: int, outcomes: list, per_client: int = 3) -> list[threading.Thread]:
    def client(i: int) -> None:
        for _ in range(per_client):
            try:
                outcomes.append(one_request(url, stream=i % 2 == 0))
            except BaseException as e:  # recorded, so that the test fails with it
                outcomes.append(("broken", repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def engine_pids(url: str) -> list[int]:
    return [e["pid"] for e in httpx.get(url + "/health", timeout=10).json()["engines"]]


def wait_health(url: str, status: int, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = httpx.get(url + "/health", timeout=10)
        if r.status_code == status:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"/health did not answer {status} in time")


def test_kill_an_engine_under_load_then_restart(tmp_path):
    srv = start(tmp_path, "--data-parallel-size", "2", "--max-tokens", "120")
    try:
        pids = engine_pids(srv.url)
        assert len(pids) == 2 and all(pids) and os.getpid() not in pids
        outcomes: list = []
        threads = load(srv.url, 16, outcomes)
        time.sleep(1.0)  # requests are running on both engines
        os.kill(pids[0], signal.SIGKILL)
        health = wait_health(srv.url, 503, timeout=10)  # the dead engine shows
        assert health["status"] == "unavailable" and not health["engines"][0]["ready"]
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a client hung"
        kinds = [k for k, _ in outcomes]
        assert "broken" not in kinds, outcomes
        assert kinds.count("ok") > 0 and kinds.count("error") > 0, kinds  # some lost with the engine, others not
        assert all("died" in what or "no engine" in what for k, what in outcomes if k == "error"), outcomes
        wait_health(srv.url, 200)  # restarted
        new = engine_pids(srv.url)
        assert new[0] != pids[0] and new[1] == pids[1]
        assert [one_request(srv.url, stream=s)[0] for s in (True, False)] == ["ok", "ok"]
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err


def stall_under_load(srv, clients: int = 8) -> tuple[list, int]:
    """SIGSTOP the (first) engine process while `clients` clients stream and not: it lives but answers nothing.
    Every client must end with an answer or a clear error naming the stall, never hang."""
    pid = engine_pids(srv.url)[0]
    outcomes: list = []
    threads = load(srv.url, clients, outcomes, per_client=4)  # some run at the stop, the later ones meet it
    time.sleep(0.3)
    os.kill(pid, signal.SIGSTOP)
    try:
        health = wait_health(srv.url, 503, timeout=30)  # seen as dead once the stall timeout passes
        # the API server that saw the stall names it; another one (--api-server-count) sees the killed process die
        assert not health["engines"][0]["ready"] and re.search("stopped answering|died", health["engines"][0]["error"])
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client hung on a stopped engine"
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # only if the server failed to kill it: let the test's stop() end it
        except ProcessLookupError:
            pass
    kinds = [k for k, _ in outcomes]
    assert "broken" not in kinds and kinds.count("error") > 0, [o for o in outcomes if o[0] != "error"]
    errors = [what for k, what in outcomes if k == "error"]
    assert any("stopped answering" in what for what in errors), errors
    assert all(re.search("stopped answering|died|no engine", what) for what in errors), errors
    return outcomes, pid


@pytest.mark.parametrize("api_servers", ["1", "2"])
def test_a_stopped_engine_is_killed_and_restarted(tmp_path, api_servers):
    srv = start(tmp_path, "--engine-stall-timeout", "3", "--api-server-count", api_servers, "--max-tokens", "400")
    try:
        _, pid = stall_under_load(srv)
        wait_health(srv.url, 200, timeout=120)  # a fresh core
        # with two API servers, each greets the fresh core on its own (every few hundred ms), so for a moment one may
        # still name the killed core while the other is ready: wait until answers in a row, whichever server gives
        # each (the kernel spreads connections over them), are all ready and name a fresh core
        deadline, in_a_row = time.time() + 30, 0
        while in_a_row < 12 and time.time() < deadline:
            r = httpx.get(srv.url + "/health", timeout=10)
            fresh = r.status_code == 200 and r.json()["engines"][0]["pid"] != pid
            in_a_row = in_a_row + 1 if fresh else 0
            time.sleep(0.05)
        assert in_a_row == 12, "an API server did not take up the restarted engine"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the stopped one is gone, not left behind
        assert [one_request(srv.url, stream=s, max_tokens=16)[0] for s in (True, False)] == ["ok", "ok"]
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err


def test_engine_death_exits_for_a_supervisor(tmp_path):
    srv = start(tmp_path, "--on-engine-death", "exit", "--max-tokens", "120")
    outcomes: list = []
    threads = load(srv.url, 8, outcomes, per_client=1)
    time.sleep(1.0)
    os.kill(engine_pids(srv.url)[0], signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert all(k in ("ok", "error") for k, _ in outcomes), outcomes
    assert srv.proc.wait(timeout=60) == 75
    err = srv.proc.stderr.read()
    assert "died" in err and "--on-engine-death exit" in err


def test_a_client_that_stops_reading_slows_nobody(tmp_path):
    srv = start(tmp_path, "--max-tokens", "16")
    try:
        host, port = "127.0.0.1", srv.port
        stuck = []
        for _ in range(4):  # streams whose readers never read: their replies pile up in the socket buffers
            s = socket.create_connection((host, port))
            body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4000, "stream": True,
                               "mode": "ar"}).encode()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            stuck.append(s)
        time.sleep(0.5)
        t0 = time.time()
        for _ in range(5):
            assert one_request(srv.url, stream=True, max_tokens=16)[0] == "ok"
        assert time.time() - t0 < 30
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        for s in stuck:
            s.close()
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err


@pytest.mark.parametrize("engine_process", ["--engine-process", "--no-engine-process"])
def test_both_layouts_answer_the_same(tmp_path, engine_process):
    srv = start(tmp_path, engine_process)
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 12, "mode": "ar"}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        (tmp_path / f"out{engine_process}").write_text(r["choices"][0]["text"])
        assert r["usage"]["completion_tokens"] == 12
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert "trimode_running_requests 0.0" in metrics
    finally:
        srv.stop()


def test_several_api_servers_and_engines(tmp_path):
    srv = start(tmp_path, "--data-parallel-size", "2", "--api-server-count", "2", "--max-tokens", "24")
    try:
        assert len(engine_pids(srv.url)) == 2
        outcomes: list = []
        for t in load(srv.url, 8, outcomes, per_client=2):
            t.join(timeout=120)
        assert [k for k, _ in outcomes] == ["ok"] * 16, outcomes
        texts = {text for _, text in outcomes}
        assert len(texts) == 1  # greedy, the same prompt: every server and engine gives the same text
    finally:
        code, err = srv.stop()
    assert code == 0 and "Traceback" not in err, err


def scrape(url: str) -> dict:
    """{(name, labels): value} of one /metrics answer (a fresh connection: any API server may answer); a series
    that shows twice fails the test."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"{key} shows twice"
            out[key] = s.value
    return out


def test_metrics_add_up_across_api_servers(tmp_path):
    srv = start(tmp_path, "--api-server-count", "2", "--max-tokens", "8")
    try:
        body = {"model": MODEL, "prompt": "hello there " * 10, "mode": "ar"}
        sent, generated, cached = 16, 0, 0
        for _ in range(sent):  # a fresh connection each: SO_REUSEPORT spreads them over both API servers
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200
            generated += r.json()["usage"]["completion_tokens"]
            cached += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0  # the same prompt: later requests found its pages in the one core's cache
        time.sleep(1.0)  # the core sends its latest stats to an API server that has not heard them within 0.5 s
        for _ in range(8):  # whichever process answers, the totals are every process's
            m = scrape(srv.url)
            assert m[("trimode_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == sent
            assert m[("trimode_generated_tokens_total", (("mode", "ar"),))] == generated
            assert m[("trimode_requests_in_flight", ())] == 0
            # the engine's counters come from the cores once, not once per API server
            assert m[("trimode_prefix_cache_hits_total", ())] == cached
            assert m[("trimode_running_requests", ())] == 0
    finally:
        code, err = srv.stop()
    assert code == 0 and "Traceback" not in err, err
