"""What crosses the engine-core process boundary comes back as it left: every `EngineRequest` field (a grammar
constraint, prompt scoring, forced lengths), every result field (the prompt scores) and a provisional block's
slots the grammar forced."""

from __future__ import annotations

import dataclasses

from trimode.decode.grammar import Constraint
from trimode.decode.result import BlockState, GenerationResult
from trimode.decode.stats import DecodeStats
from trimode.engine.request import EngineRequest
from trimode.engine.scoring import PromptLogprob
from trimode.engine.wire import decode, encode, event_from_wire, event_to_wire, request_from_wire, request_to_wire


def test_a_request_crosses_with_every_field():
    req = EngineRequest([5, 6, 7], "linear_spec", 9, 0.7, 0.9, 5, 3, ["."], True, {"block_length": 4},
                        ignore_eos=False, prompt_logprobs=2, repetition_penalty=1.3, frequency_penalty=0.5,
                        presence_penalty=-0.5, logit_bias={7: -100.0, 9: 2.5}, min_tokens=2, logprobs=3,
                        constraint=Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    back = request_from_wire(decode(encode(request_to_wire(req))))
    assert dataclasses.asdict(back) == dataclasses.asdict(req)
    assert isinstance(back.constraint, Constraint)


def test_a_result_crosses_with_its_prompt_scores():
    scores = [None, PromptLogprob(6, -1.5, 2, [(4, -0.5), (6, -1.5)])]
    r = GenerationResult([8], "x", DecodeStats("ar", forward_passes=1), "length", prompt_logprobs=scores,
                         logprobs=[(-0.25, [(8, -0.25), (3, -2.0)])])
    kind, fields = event_to_wire(r)
    back = event_from_wire(kind, decode(encode(fields)))
    assert back.prompt_logprobs == scores and back.stats == r.stats
    assert [(lp, [tuple(t) for t in top]) for lp, top in back.logprobs] == r.logprobs


def test_a_block_crosses_with_its_forced_slots():
    block = BlockState([5, None, 9], "x", 3, forced=[True, False, False])
    kind, fields = event_to_wire(block)
    assert event_from_wire(kind, decode(encode(fields))) == block
