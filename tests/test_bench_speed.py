"""`trimode bench speed` and `trimode bench engine` end to end on the tiny checkpoint: every table, and
transformers' greedy tokens equal to this engine's on the exported weights, in the same run (the timings themselves
are not asserted)."""

from typer.testing import CliRunner

from tests.conftest import TINY_A
from trimode.cli import app


def test_bench_speed_report(tmp_path):
    out = tmp_path / "speed.md"
    r = CliRunner().invoke(app, ["bench", "speed", "--model", str(TINY_A), "-n", "12", "--repeats", "1", "--iters",
                                 "1", "--token-counts", "1,8,72", "--context", "16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("Command: `trimode bench speed --model ")
    for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {mode} |"))
        assert row.split("|")[3].strip() == "12"  # EOS ignored: every mode generates exactly -n tokens
    assert "| ar | - | 12 | 12 | 1.00 |" in text
    for t in (1, 8, 72):
        assert any(line.startswith(f"| {t} | ") for line in text.splitlines())
    assert "Greedy tokens: identical." in text
    assert "Speed ratio trimode / transformers:" in text
    assert "| trimode ar | 12 |" in text and "| transformers generate | 12 |" in text


def test_bench_speed_static_path_on_cpu(tmp_path):
    r = CliRunner().invoke(app, ["bench", "speed", "--model", str(TINY_A), "-n", "6", "--repeats", "1", "--iters",
                                 "1", "--token-counts", "1,8", "--modes", "ar,linear_spec", "--static", "--no-hf"])
    assert r.exit_code == 0, r.output
    assert "static cache (eager)" in r.output and "transformers" not in r.output


def test_bench_speed_errors():
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "speed", "--model", str(TINY_A), "--prompt", "hello"])
    assert r.exit_code == 2 and "no tokenizer.json" in r.output
    r = runner.invoke(app, ["bench", "speed", "--model", str(TINY_A), "--modes", "warp"])
    assert r.exit_code == 2 and "unknown mode" in r.output
    r = runner.invoke(app, ["bench", "speed", "--model", str(TINY_A), "--token-counts", "1,a"])
    assert r.exit_code == 2 and "--token-counts" in r.output


def test_bench_engine_reports_both_kinds_of_served_clients(tmp_path):
    out = tmp_path / "engine.md"
    r = CliRunner().invoke(app, ["bench", "engine", "--model", str(TINY_A), "--modes", "ar,linear_spec", "--requests",
                                 "3", "-n", "4", "--rounds", "1", "--served", "asyncio,asyncio-std,threads", "--out",
                                 str(out)])
    assert r.exit_code == 0, r.output
    table = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert "served (asyncio) / bare" in table[0] and "served (threads) / bare" in table[0]
    assert "served (asyncio-std) / bare" in table[0]  # Python's own loop beside the server's (uvloop)
    assert "reader CPU ms / step (asyncio)" in table[0] and "reader CPU ms / step (threads)" in table[0]
    for row in table[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # ratios, then the readers' CPU per step: they read every event, so it is never zero
        assert cells[1] == "3" and all(float(c.split()[0]) > 0 for c in cells[4:11]), row
    bad = CliRunner().invoke(app, ["bench", "engine", "--model", str(TINY_A), "--served", "processes"])
    assert bad.exit_code != 0 and "--served" in bad.output


def test_bench_engine_served_by_an_engine_core_process(tmp_path):
    """`--served process`: the engine core in its own process (the HTTP server's default layout); the forwards it
    ran come back from the core's trace file and are replayed bare (so its ratio is a real one)."""
    from trimode import load
    from trimode.bench.engine_bench import _prompts, run_served

    tm = load(TINY_A)
    prompts = _prompts(3, 5, tm.config.vocab_size, 0)
    seconds, tokens, trace, cpu = run_served(tm, "ar", prompts, 4, {}, "process")
    assert seconds > 0 and tokens == 3 * 4 and cpu > 0
    # every request's prompt pass and its 3 one-token steps, however the core batched them
    shapes = [s for forward in trace for s in forward]
    assert sum(s.rows for s in shapes if s.tokens == 5) == 3 and sum(s.rows for s in shapes if s.tokens == 1) == 9
    out = tmp_path / "engine.md"
    r = CliRunner().invoke(app, ["bench", "engine", "--model", str(TINY_A), "--modes", "ar", "--requests", "2", "-n",
                                 "3", "--rounds", "1", "--served", "process", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert "served (process) / bare" in table[0] and "reader CPU ms / step (process)" in table[0]
    cells = [c.strip() for c in table[1].strip("|").split("|")]
    assert float(cells[5].split()[0]) > 0, table[1]
