"""Text from committed tokens: the stream decoded on the loop thread and the one left to its reader give the same
text, delta by delta (byte-level tokens that split UTF-8 characters included); the engine decodes nothing on its
loop thread for a request without stop strings."""

import random
import threading

import pytest

import trimode
from trimode.decode.result import Delta, GenerationResult
from trimode.decode.stopping import StopRule
from trimode.decode.text import DeferredText, TextStream
from trimode.engine import Engine, EngineRequest


@pytest.fixture(scope="module")
def tm():
    return trimode.load()  # the bundled model: a byte-level tokenizer, multi-byte characters span tokens


def test_deferred_text_equals_the_stream_decoded_at_once(tm):
    rng = random.Random(0)
    texts = ["naïve café 日本語", "plain ascii words", "emoji 🙂 and ü", "日本"]
    for trial in range(60):
        ids = tm.tokenizer.encode(rng.choice(texts))
        ids = ids[: rng.randint(1, len(ids))]  # often ends inside a character
        budget = rng.randint(1, len(ids) + 2)
        eos = frozenset([ids[rng.randrange(len(ids))]]) if trial % 3 == 0 else frozenset()
        rule = StopRule(max_new_tokens=budget, eos_token_ids=eos)
        now, later = TextStream(tm.tokenizer, rule), TextStream(tm.tokenizer, rule, defer=True)
        reader = DeferredText(tm.tokenizer.decode)
        at = 0
        while at < len(ids) and not now.done:
            chunk = ids[at : at + rng.randint(1, 3)]
            at += len(chunk)
            a, b = now.add(chunk), later.add(chunk)
            assert (a is None) == (b is None)
            if a is not None:
                assert b.text is None
                b = reader.settle(b)
                assert (b.token_ids, b.text) == (a.token_ids, a.text)
        assert later.tokens == now.tokens and later.finish_reason == now.finish_reason
        result = reader.settle(GenerationResult(list(later.tokens), None, None, later.finish_reason))
        assert result.text == now.text


def test_stop_strings_are_never_deferred(tm):
    s = TextStream(tm.tokenizer, StopRule(max_new_tokens=8, eos_token_ids=frozenset()), ["ab"], defer=True)
    assert not s.deferred
    delta = s.add(tm.tokenizer.encode("xx"))
    assert isinstance(delta, Delta) and delta.text == "xx"


def test_the_engine_loop_decodes_nothing_for_a_request_without_stop_strings(tm):
    """Its reader does the decoding; with a stop string the loop must decode (the stop ends the machine there)."""
    decode, threads = tm.tokenizer.decode, []

    def recording(ids, *args, **kwargs):
        threads.append(threading.get_ident())
        return decode(ids, *args, **kwargs)

    prompt = tm.tokenizer.encode("Question: what is 2 + 3?\nAnswer:")
    engine = Engine(tm)
    tm.tokenizer.decode = recording
    try:
        engine.start()
        loop = engine._thread.ident
        for stop in (None, ["\n"]):
            threads.clear()
            handle = engine.submit(EngineRequest(prompt_ids=prompt, max_new_tokens=24, stop=stop))
            events = list(handle)
            result = events[-1]
            deltas = [e for e in events if isinstance(e, Delta)]
            assert "".join(d.text for d in deltas) == result.text
            alone = tm.generate(prompt, max_new_tokens=24, stop=stop)
            assert (result.token_ids, result.text) == (alone.token_ids, alone.text)
            on_loop = sum(t == loop for t in threads)
            assert on_loop == 0 if stop is None else on_loop > 0
    finally:
        tm.tokenizer.decode = decode
        engine.stop()


def test_deferred_text_survives_preemption_and_cancellation(tm):
    """A preempted request restarts and replays; its reader sees each token once, so the streamed text and the
    result's are the request's text alone. A request cancelled mid-stream ends with the text it had shown."""
    prompts = [tm.tokenizer.encode(p) for p in ("Once upon a time", "The capital of France is", "1, 2, 3,")]
    engine = Engine(tm, kv_cache_tokens=64, page_size=8)
    no_eos = {"eos_token_id": -1}  # full length, so the pool runs dry
    handles = [engine.submit(EngineRequest(prompt_ids=p, max_new_tokens=40, knobs=no_eos)) for p in prompts]
    while not all(h.done for h in handles):
        engine.step()
    assert engine.stats()["preemptions"] >= 1
    for h, p in zip(handles, prompts):
        events = list(h)
        result = events[-1]
        text = "".join(e.text for e in events if isinstance(e, Delta))
        assert text == result.text
        alone = tm.generate(p, max_new_tokens=40, **no_eos)
        assert (result.token_ids, result.text) == (alone.token_ids, alone.text)

    engine = Engine(tm)
    handle = engine.submit(EngineRequest(prompt_ids=prompts[0], max_new_tokens=40, knobs=no_eos))
    for _ in range(6):
        engine.step()
    handle.cancel()
    while not handle.done:
        engine.step()
    events = list(handle)
    assert events[-1].finish_reason == "cancelled"
    assert "".join(e.text for e in events if isinstance(e, Delta)) == events[-1].text
