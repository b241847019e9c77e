"""Tokens per forward pass with and without a JSON schema, per mode, on the bundled model (docs/structured.md).

    PYTHONPATH=$PWD python scripts/structured_speed.py

Prints one markdown row per mode and constraint: tokens, forward passes, tokens per forward, answers that parse
as JSON, seconds.
"""

from __future__ import annotations

import json
import time

import trimode

SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 9},
                         "reason": {"type": "string", "maxLength": 12}},
          "required": ["label", "score", "reason"], "additionalProperties": False}
QUESTIONS = ["Classify: good film", "Classify: bad day", "What is 3 + 4?", "Sort 5 2 9.", "Name a fruit.",
             "Reverse cat.", "Count to three.", "Is 7 prime?"]
RUNS = [("ar", {}), ("linear_spec", {"block_length": 8}), ("quadratic_spec", {"block_length": 4}),
        ("diffusion", {"block_length": 16}), ("diffusion", {"block_length": 16, "threshold": None, "steps": 4})]


def main() -> None:
    tm = trimode.load()
    for mode, knobs in RUNS:
        for label, constraint in (("none", {}), ("schema", {"json_schema": SCHEMA})):
            tokens = forwards = valid = 0
            t0 = time.perf_counter()
            for q in QUESTIONS:
                ids = tm.tokenizer.encode_chat([{"role": "user", "content": q + " Answer in JSON."}])
                r = tm.generate(ids, mode=mode, max_new_tokens=64, **knobs, **constraint)
                tokens, forwards = tokens + len(r.token_ids), forwards + r.stats.forward_passes
                try:
                    json.loads(r.text)
                    valid += 1
                except ValueError:
                    pass
            name = mode + (" (4 steps)" if "steps" in knobs else "")
            shown = f"{valid}/{len(QUESTIONS)}" if constraint else "-"
            print(f"| {name} | {label} | {tokens} | {forwards} | {tokens / forwards:.2f} | {shown} | "
                  f"{time.perf_counter() - t0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
