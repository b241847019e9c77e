"""`trimode serve` as a user starts it: a subprocess, a port, the real `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from tests.test_serve_api import MODES, POLICY, build_checkpoint
from trimode.api import default_model_path
from trimode.cli import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trimode_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trimode.cli", *args]


class Served:
    """`trimode serve ...` in a subprocess, stopped with Ctrl-C (SIGINT) like a terminal user would."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One torch thread, as the in-process tests use (conftest): with two threads on a CPU that other jobs
        # keep busy, the engine's start-up timings spin for minutes.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(trimode_cmd("serve", "--port", str(self.port), *args), cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120) -> bool:
        """True once /health answers; False if the process exited first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()  # do not leave the server running when the test fails
        raise AssertionError("the server did not start in time")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def chat_in_every_mode(url: str, model: str, api_key: str = "none") -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [model]
    for mode in MODES:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=8, extra_body={"mode": mode})
        assert r.model_extra["trimode"]["mode"] == mode
        assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")


def test_serve_command_end_to_end(tmp_path):
    ckpt = build_checkpoint(tmp_path / "tiny-ckpt")
    (tmp_path / "policy.yaml").write_text(POLICY)
    srv = Served(["--model", str(ckpt), "--api-key", "sekrit", "--policy", "policy.yaml", "--audit-log",
                  "logs/audit.jsonl", "--max-tokens", "8", "--log-level", "warning",
                  "--auto-config", '{"modes": ["ar", "linear_spec"], "smaller_blocks": false}'], cwd=tmp_path)
    try:
        assert srv.wait_ready(), srv.stop()[1]
        chat_in_every_mode(srv.url, "tiny-ckpt", api_key="sekrit")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny-ckpt", "prompt": "x"},
                       headers={"Authorization": "Bearer sekrit", "X-Trimode-Route": "legal_contract_clause"})
        assert r.status_code == 200 and r.json()["trimode"]["mode"] == "ar"
        assert r.json()["usage"]["completion_tokens"] == 8  # --max-tokens is the default budget
        entry = json.loads((tmp_path / "logs" / "audit.jsonl").read_text().splitlines()[-1])
        assert entry["request_id"] == r.json()["id"] and entry["human_review"] == "required"
        assert httpx.post(srv.url + "/v1/completions", json={"model": "tiny-ckpt", "prompt": "x"}).status_code == 401
        auto = httpx.get(srv.url + "/health").json()["auto"]  # --auto-config reached the engine
        assert auto["modes"] == ["ar", "linear_spec"] and set(auto["slowdown"]) == {"ar", "linear_spec@4"}
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err
    assert "serving 'tiny-ckpt' on http://127.0.0.1" in err


ARTICLE = Path(__file__).parent.parent / "docs" / "policy.article.yaml"


def test_serve_with_the_articles_policy_and_limits(tmp_path):
    """The article's policy (docs/policy.article.yaml), which once stopped the server at start-up, serves its four
    routes; --max-queue 0 is no waiting room (not reject-all), --max-body-mb bounds the body."""
    ckpt = build_checkpoint(tmp_path / "tiny-ckpt")
    srv = Served(["--model", str(ckpt), "--policy", str(ARTICLE), "--audit-log", "audit.jsonl", "--max-tokens", "4",
                  "--max-queue", "0", "--max-running", "4", "--max-body-mb", "1", "--log-level", "warning"],
                 cwd=tmp_path)
    try:
        assert srv.wait_ready(), srv.stop()[1]
        health = httpx.get(srv.url + "/health").json()
        assert (health["max_running"], health["max_queue"]) == (4, 0)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        expected = {"coding_autocomplete": "latency", "internal_summary": "cost_and_speed",
                    "legal_contract_clause": "accuracy_and_auditability", "customer_response": "balanced"}
        for route, priority in expected.items():
            r = client.completions.create(model="tiny-ckpt", prompt="def add(a, b):", max_tokens=4,
                                          extra_body={"route": route, "risk": "high"})
            policy = r.model_extra["trimode"]["policy"]
            assert (policy["route"], policy["priority"]) == (route, priority)
            assert r.model_extra["trimode"]["mode"] == policy["decision"]["mode"]
        entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        legal = [e for e in entries if e["route"] == "legal_contract_clause"]
        assert len(legal) == 1 and legal[0]["review_flag"] and legal[0]["risk"] == "high" and legal[0]["logprobs"]
        big = httpx.post(srv.url + "/v1/completions", content=b"x" * (2 << 20), timeout=60)
        assert big.status_code == 413
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err
    assert "policy" in err and "4 routes" in err


def serve_cli(*args: str):
    """`trimode serve ARGS` in this process (for the errors raised before anything is served)."""
    return CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "200"})


def test_bad_policy_stops_start_up_with_the_line(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("ai_generation_policy:\n  a: {mode: ar}\n  b: {mode: sideways}\n")
    result = serve_cli("--model", str(tmp_path / "not-loaded-first"), "--policy", str(policy))
    assert result.exit_code == 2
    assert result.stderr == f"error: {policy}:3: route 'b': unknown mode 'sideways' (choose from ar, " \
                            "autoregressive, autoregressive_verified, diffusion, linear_spec, self_speculative, " \
                            "quadratic_spec, auto)\n"


def test_bad_model_and_options_are_one_line_errors(tmp_path):
    for args, needle in ((["--model", str(tmp_path / "nowhere")], "no checkpoint directory"),
                         (["--model", str(tmp_path)], "missing config.json"),
                         (["--mode", "fast"], "unknown --mode 'fast'"),
                         (["--threshold", "2"], "--threshold must be in [0, 1]"),
                         (["--block-length", "0"], "--block-length must be >= 1"),
                         (["--max-running", "0"], "--max-running must be >= 1"),
                         (["--max-queue", "-1"], "--max-queue >= 0"),
                         (["--max-body-mb", "0"], "--max-body-mb must allow at least 1 KiB"),
                         (["--auto-config", "{"], "--auto-config is not valid JSON"),
                         (["--auto-config", "[]"], "--auto-config must be a JSON object"),
                         (["--auto-config", '{"margin": 1}'], "unknown setting(s) margin; known: cost_sizes"),
                         (["--auto-config", '{"spec_margin": "x"}'], 'spec_margin must be a number, got "x"'),
                         (["--auto-config", '{"modes": ["ar", "fast"]}'], "auto modes must be a non-empty subset")):
        result = serve_cli(*args)
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_new_user_serve_with_no_model_named(tmp_path):
    """`trimode serve` with no --model serves the bundled model and answers chat in every mode."""
    srv = Served(["--log-level", "warning"], cwd=tmp_path)
    ready = srv.wait_ready()
    try:
        if not ready:
            code, err = srv.stop()
            assert code == 2 and "bundled default model is missing" in err and "Traceback" not in err, err
            assert not (default_model_path() / "config.json").is_file()
            pytest.skip("the bundled default model is not in the package yet (trimode/data/default_model/)")
        chat_in_every_mode(srv.url, "trimode-default")
    finally:
        srv.stop()


def test_help_lists_serve():
    result = serve_cli("--help")
    assert result.exit_code == 0
    for option in ("--model", "--host", "--port", "--api-key", "--policy", "--audit-log", "--mode", "--max-queue",
                   "--max-running", "--max-body-mb"):
        assert option in result.stdout


def test_auto_config_json_becomes_the_engines_settings():
    from trimode.engine import AutoConfig
    from trimode.serve.cli import parse_auto_config

    got = parse_auto_config('{"spec_margin": 0, "modes": ["ar", "quadratic_spec"], "explore_every": 0}')
    assert got == AutoConfig(spec_margin=0, modes=("ar", "quadratic_spec"), explore_every=0)


def test_the_server_runs_on_uvloop_where_installed():
    """`trimode serve` hands uvicorn `event_loop.NAME`; benchmarks read the engine on the same loop (`run`). uvloop
    is a dependency except on Windows."""
    import asyncio

    from trimode.serve import event_loop

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    if sys.platform != "win32":
        assert event_loop.NAME == "uvloop"
        assert event_loop.run(loop_module()).startswith("uvloop")
    else:
        assert event_loop.run(loop_module()).startswith("asyncio")
