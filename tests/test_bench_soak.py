"""`trimode bench soak` against the real server (a tiny model served as "bench"): a short soak with every kind of
traffic, nothing answered wrongly, the server idle and healthy afterwards; and the command's report."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

import trimode
from tests.test_serve_api import ServerThread, build_checkpoint
from trimode.bench import soak as sk
from trimode.cli import app
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tm = trimode.load(build_checkpoint(tmp_path_factory.mktemp("soak") / "bench", context=1024))  # the task prompts
    with ServerThread(create_app(Engine(tm), ServerConfig("bench", default_max_tokens=8))) as srv:
        yield srv.url


def test_a_short_soak_mixes_everything_and_leaves_the_server_idle(url):
    result = sk.run(None, url, clients=8, seconds=4, max_tokens=6, seed=1, echo=lambda line: None)
    kinds = {o.kind for o in result.outcomes}
    assert kinds == {kind for kind, _ in sk.MIX}, kinds
    assert not result.errors(), result.errors()
    statuses = {o.status for o in result.outcomes}
    assert 200 in statuses and 400 in statuses and "left" in statuses
    assert not any(isinstance(s, int) and s >= 500 for s in statuses)
    assert result.idle_after_s is not None and result.health_after_s < 1.0
    text = sk.report(result, "header")
    assert "answered 5xx" in text and "| hostile |" in text and "p50" in text and "Errors (an answer" in text


def test_rss_reads_this_process():
    now, peak = sk.rss(os.getpid())
    assert now is None or 0 < now <= peak


def test_soak_command(url, tmp_path):
    out = tmp_path / "soak.md"
    result = CliRunner().invoke(app, ["bench", "soak", "--url", url, "--clients", "4", "--duration", "2",
                                      "--max-tokens", "4", "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("Command: `trimode bench soak --url") and "4 clients in 2 s" in text
    bad = CliRunner().invoke(app, ["bench", "soak", "--clients", "0"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "--clients" in bad.stderr
