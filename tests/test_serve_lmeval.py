"""lm-evaluation-harness against a live `trimode serve` (the bundled model, a subprocess), run with the `lm_eval`
command as a user runs it: the `local-completions` model with the `remote` tokenizer (vLLM's /tokenize,
/detokenize, /tokenizer_info), a multiple-choice task scored by loglikelihood (`echo` + `logprobs` over batches
of token-id prompts) and a generation task scored by exact match. The tasks and their data are in
tests/data/lmeval/ (the data made from `trimode.tasks` held-out items by `make_data`, checked below)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import trimode
from trimode.tasks import load_tasks, prompt_text

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "lmeval"
TASKS = ("sort", "reverse", "copy")


def make_data(tokenizer) -> dict[str, list[dict]]:
    """mc.jsonl: each item's right answer among a wrong order (the answer reversed) and the next item's answer,
    in an order that varies; gen.jsonl: prompt and answer."""
    mc, gen = [], []
    for name in TASKS:
        items = load_tasks(name, n=12, seed=0, split="heldout")
        for i, item in enumerate(items):
            prompt = prompt_text(item, tokenizer)
            if i < 8:
                gen.append({"prompt": prompt, "answer": item.answer})
            wrong = [" ".join(reversed(item.answer.split())), items[(i + 1) % len(items)].answer,
                     items[(i + 2) % len(items)].answer]
            distractors = [w for k, w in enumerate(wrong) if w != item.answer and w not in wrong[:k]][:2]
            choices = distractors[:]
            choices.insert(i % 3, item.answer)
            mc.append({"prompt": prompt, "choices": choices, "label": choices.index(item.answer)})
    return {"mc": mc, "gen": gen}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_shipped_data_is_made_by_make_data():
    made = make_data(trimode.load().tokenizer)
    for name, rows in made.items():
        assert (DATA / f"{name}.jsonl").read_text() == jsonl(rows), f"regenerate {name}.jsonl with make_data"
    assert all(len(r["choices"]) == 3 for r in made["mc"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lm_eval_against_trimode_serve(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "lm-eval-key", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "trimode.cli", "serve", "--port", str(port), "--api-key",
                               "lm-eval-key", "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, "trimode serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        out = tmp_path / "results"
        subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                        f"model=trimode-default,base_url=http://127.0.0.1:{port}/v1/completions,"
                        "tokenizer_backend=remote,auth_token=lm-eval-key,num_concurrent=1,max_retries=1",
                        "--tasks", "trimode_mc,trimode_gen", "--include_path", str(DATA), "--batch_size", "8",
                        "--output_path", str(out)], cwd=ROOT, env=env, check=True, timeout=600)
    finally:
        server.terminate()
        server.wait(30)
    report = json.loads(next(out.rglob("results_*.json")).read_text())
    results = report["results"]
    print(json.dumps(results, indent=1))
    assert {k: v["effective"] for k, v in report["n-samples"].items()} == {"trimode_mc": 36, "trimode_gen": 24}
    assert results["trimode_mc"]["acc,none"] >= 0.9
    assert results["trimode_gen"]["exact_match,none"] >= 0.8
