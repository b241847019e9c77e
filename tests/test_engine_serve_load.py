"""Load on the real server: 64 concurrent streaming `openai` clients, none failing or lost, answers unchanged by
the load; and the `bench serve` report and plot from those runs."""

from __future__ import annotations

import asyncio

import pytest
import torch

import trimode
from tests.test_serve_api import ServerThread, build_checkpoint
from trimode.bench import serve_bench as sb
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app

PROMPTS = ["def add(a, b):", "The quick brown fox", "Hello, world!", "for i in range(10):"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs on a shared 2-core machine
    tm = trimode.load(build_checkpoint(tmp_path_factory.mktemp("load") / "bench"), device="cpu")
    app = create_app(Engine(tm, max_queue=128), ServerConfig("bench", default_max_tokens=8))
    with ServerThread(app) as server:
        yield tm, server.url + "/v1"
    torch.set_num_threads(before)


@pytest.mark.parametrize(("mode", "api"), [("auto", "chat"), ("diffusion", "completions")])
def test_64_streaming_clients_none_lost(served, mode, api):
    tm, url = served
    cell = asyncio.run(sb.run_cell(url, "bench", mode, 64, 1, PROMPTS, 8, "none", api))
    assert cell.errors == []
    assert (cell.sent, cell.done) == (64, 64)
    assert cell.tokens > 0 and cell.forwards > 0 and len(cell.ttft) > 0
    # Batch invariance through the whole stack: the answer under load is the answer alone.
    if api == "chat":
        inputs = [tm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    else:
        inputs = PROMPTS
    alone = [tm.generate(p, mode="ar" if mode == "auto" else mode, max_new_tokens=8).token_ids for p in inputs]
    assert cell.tokens == 16 * sum(len(t) for t in alone)


def test_bench_report_and_plot(served, tmp_path):
    _, url = served
    cells = [asyncio.run(sb.run_cell(url, "bench", m, n, 2, PROMPTS, 6, "none"))
             for n in (1, 4) for m in ("ar", "auto")]
    auto = sb.auto_state(url, "none")  # the server's /health shows what auto has learned
    assert sum(auto["picks"].values()) > 0 and auto["slowdown"] and "tokens_per_cycle" in auto
    text = sb.report(cells, "header", auto)
    assert text.count("| auto |") == 2 and "auto against the best fixed mode" in text
    assert "auto's learned state at the end of the run" in text
    assert "1 clients: auto" in text and "4 clients: auto" in text
    sb.plot(cells, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    merged = sb.merge([cells[0], cells[0]])
    assert merged.ok == 2 * cells[0].done and merged.tokens_per_s == cells[0].tokens_per_s


def test_bench_serve_structured_runs_each_mode_free_and_under_the_schema(served):
    """`bench serve --structured`: held-out JSON-task chats, each mode once free and once with the prompt's schema
    as response_format; the report pairs their tokens per forward (the server's own counts)."""
    _, url = served
    prompts = sb.structured_prompts(n=2)
    assert len(prompts) == 8 and all(p.schema["type"] == "object" and p.messages[0]["role"] == "system"
                                     for p in prompts)
    cells = [asyncio.run(sb.run_cell(url, "bench", "diffusion", 4, 1, prompts, 16, "none", "chat", schema))
             for schema in (False, True)]
    assert [c.mode for c in cells] == ["diffusion", "diffusion + schema"]
    assert all(c.errors == [] and c.done == 4 and c.forwards > 0 and c.checked == 4 for c in cells)
    text = sb.report(cells, "header")
    assert "- diffusion x4: " in text and "free" in text and "under the schema" in text
    assert f"right {cells[0].right}/4 " in text and f"{cells[1].right}/4 " in text
    assert not any(p.check("not json") or p.check("{}") for p in prompts)


def test_auto_verdicts_compare_with_the_best_fixed_and_the_best_lossless_mode():
    cells = [sb.Cell("ar", 4, wall=1.0, tokens=100, round_tokens_per_s=[90.0, 100.0, 104.0]),
             sb.Cell("diffusion", 4, wall=1.0, tokens=120),
             sb.Cell("auto", 4, wall=1.0, tokens=110, round_tokens_per_s=[95.0, 110.0, 111.0])]
    (line,) = sb.auto_verdicts(cells)
    assert line == ("4 clients: auto 110.0 (rounds 95-111); vs best fixed diffusion 120.0 (rounds 120-120): 0.92x "
                    "BELOW; vs best lossless ar 100.0 (rounds 90-104): 1.10x at or above (per round: 1.06, 1.10, "
                    "1.07)")
    cells[1].round_tokens_per_s = [108.0, 120.0, 125.0]
    (line,) = sb.auto_verdicts(cells)
    assert "diffusion 120.0 (rounds 108-125): 0.92x BELOW (the rounds overlap) (per round: 0.88, 0.92, 0.89)" in line


def test_bench_serve_checks_auto_config_before_starting_a_server():
    from typer.testing import CliRunner

    from trimode.cli import app

    for args, needle in ((["--auto-config", '{"spec_margin": -1}'], "spec_margin >= 0"),
                         (["--url", "http://127.0.0.1:9/v1", "--auto-config", "{}"], "cannot change the one at --url")):
        result = CliRunner().invoke(app, ["bench", "serve", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_bench_serve_vs_engine(tmp_path):
    """`bench serve --vs-engine`: a real `trimode serve` child beside the engine in this process, one table with the
    engine's row and the server's streamed and whole rows, their ratio, TTFT and ITL."""
    from typer.testing import CliRunner

    from trimode.cli import app

    out = tmp_path / "vs.md"  # the bundled model: the bench prompts fit its context
    args = ["bench", "serve", "--vs-engine", "process", "--concurrency", "2",
            "--requests", "4", "--max-tokens", "6", "--rounds", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    got = {(r[0].strip(), r[2].strip()): r for r in rows}
    assert set(got) == {("engine", "events"), ("process", "yes"), ("process", "no")}, rows
    for r in got.values():
        assert r[1].strip() == "2" and r[3].strip() == "4" and r[4].strip() == "0", r  # 4 ok, 0 errors
        assert float(r[5]) > 0
    assert got[("process", "yes")][6].strip().endswith("x") and "nan" not in got[("process", "yes")][8]
    assert "trimode bench serve --vs-engine process --modes ar" in out.read_text()
    assert "/health answered 200 after" in result.stderr  # how long a user waits for the server
    bad = CliRunner().invoke(app, ["bench", "serve", "--vs-engine", "sideways"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "choose layouts from" in bad.stderr
