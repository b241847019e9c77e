"""The `trimode` console script, run as a user runs it (a real subprocess)."""

import subprocess
import sys

from tests.conftest import TINY_A


def trimode(*args):
    return subprocess.run([sys.executable, "-m", "trimode.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_tokens_and_summary():
    r = trimode("generate", "--model", str(TINY_A), "--mode", "linear_spec", "-n", "16", "136 250 96")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["62", "39", "129", "5", "242", "81", "11"]  # stops at EOS (11)
    assert "[linear_spec] 7 tokens" in r.stderr and "tokens/forward" in r.stderr and "tok/s" in r.stderr


def test_bad_input_is_one_line_not_a_traceback():
    for args in (["generate", "--model", "/no/such/dir", "x"],
                 ["generate", "--model", str(TINY_A), "not ids"],
                 ["generate", "--model", str(TINY_A), "--mode", "diffusion", "--threshold", "2", "1 2"]):
        r = trimode(*args)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_commands():
    r = trimode("--help")
    assert r.returncode == 0 and "generate" in r.stdout
