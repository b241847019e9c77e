"""`TRIMODE_TEST_ENGINE_PROCESS=1 pytest tests/test_serve_*.py`: the server suites with the engine in its own process.

The tests build `create_app(Engine(tm, ...), config)`; under this switch (installed by conftest.py before any test
module imports `create_app`) the in-process engine is swapped for an `EngineClient` of one engine-core process
that loads the same checkpoint (`tm.path`, dtype, device) with the same engine settings. Engines on a model with
no checkpoint directory (built in memory) stay in-process. The test's own `Engine` object then answers `stats()`
with the core's figures.
"""

from __future__ import annotations

import os

import trimode.serve.app as app_module

ENABLED = os.environ.get("TRIMODE_TEST_ENGINE_PROCESS") == "1"
# Tests that hold the in-process engine's loop back (they replace its `start`): a core's loop cannot be held.
IN_PROCESS_ONLY = {"test_queue_full_gets_429"}


def as_core_process(engine):
    from trimode.engine.client import EngineClient
    from trimode.engine.core_process import CoreSet, CoreSpec

    tm = engine.tm
    if tm.path is None or not (tm.path / "config.json").is_file():
        return engine
    s = engine.scheduler
    settings = dict(max_queue=s.max_queue, max_running=s.max_running, max_batch_tokens=s.max_batch_tokens,
                    prefill_chunk=s.prefill_chunk, kv_budget_tokens=engine.kv_budget_tokens,
                    max_pass_bytes=engine.max_pass_bytes, auto=engine.auto_config, cost=engine._cost,
                    page_size=engine.pool.page_size, prefix_cache=engine.pool.cache is not None)
    spec = CoreSpec(str(tm.path), str(tm.net.dtype).removeprefix("torch."), tm.net.device.type, tm.has_drafter,
                    settings)
    client = EngineClient(tm, CoreSet(spec)).start()  # loaded before the test's server-start deadline counts
    engine.stats = client.stats  # a test that reads its engine's counters reads the core's
    return client


def install() -> None:
    original = app_module.create_app

    def create_app(engine, config):
        return original(as_core_process(engine), config)

    app_module.create_app = create_app


def skip_in_process_only(items) -> None:
    import pytest

    for item in items:
        if item.originalname in IN_PROCESS_ONLY:
            item.add_marker(pytest.mark.skip(reason="holds the in-process engine loop back"))
