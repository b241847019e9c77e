"""The diagnostic scripts docs/engine.md quotes still run (tiny sizes: what they print is checked, not timed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_engine_step_split_reports_every_part_of_a_step():
    out = run("scripts/engine_step_split.py", "--rows", "2", "--new", "4", "--rounds", "1")
    line = out.splitlines()[-1]
    for part in ("plan", "forward", "decide", "advance", "rest", "bare forwards", "engine / bare"):
        assert part in line, line


def test_paged_attention_cpu_reads_the_same_values_as_the_engine():
    out = run("scripts/paged_attention_cpu.py", "--rows", "4", "--prompt", "8", "--past", "20", "--rounds", "1",
              "--reps", "2", "--no-flex")
    lines = [x.strip() for x in out.splitlines()]
    assert any(x.startswith("engine: paged gather") for x in lines)
    bare = next(x for x in lines if x.startswith("bare: contiguous cache"))
    # the engine's pages hold what the bare network's contiguous cache holds: the same attention output
    assert float(bare.rsplit(" ", 1)[1]) < 1e-5, bare


def test_paged_attention_cpu_refuses_a_past_shorter_than_the_prompt():
    done = subprocess.run([sys.executable, "scripts/paged_attention_cpu.py", "--prompt", "32", "--past", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--past >= --prompt" in done.stderr
