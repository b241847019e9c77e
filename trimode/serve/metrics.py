"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Per mode (the mode that ran): requests, prompt and generated tokens, forward passes, tokens per forward and
acceptance length (per speculative cycle) histograms, latency and time-to-first-token histograms. Engine
gauges (queue depth, running requests, KV pages) and counters (prefix-cache lookups, preemptions) are read from
`Engine.stats()` at scrape time.

Several API server processes (`trimode serve --api-server-count M`): the supervisor sets PROMETHEUS_MULTIPROC_DIR
to a private directory before it starts them, so prometheus_client keeps each process's HTTP metrics in files
there, and a scrape of any process merges every process's files (`MultiProcessCollector`; the in-flight gauge
sums the live processes). The engine's own numbers are not in those files: the answering process reads them from
its engine client (every core's latest stats, summed), once, so they are not counted once per API server.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from trimode.api import GenerationResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no `_created` series: a scraper reads them as extra samples (process-wide setting)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPF_BUCKETS = (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 32)
ACCEPTANCE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64)


# name, help, the `Engine.stats()` key: counted by the engine (Prometheus counters) or its state now (gauges).
ENGINE_COUNTERS = (
    ("trimode_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
    ("trimode_prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV not computed)",
     "prefix_cache_hits"),
    ("trimode_preemptions", "Running requests preempted to free KV pages (recomputed later)", "preemptions"),
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set: this process is one of several API servers (prometheus_client's)
ENGINE_GAUGES = (
    ("trimode_queue_depth", "Requests waiting in the engine queue", "queue_depth"),
    ("trimode_running_requests", "Requests being decoded by the engine", "running_requests"),
    ("trimode_kv_pages_used", "KV pages held by at least one request", "kv_pages_used"),
    ("trimode_kv_pages_cached", "KV pages in the prefix cache, held or idle (idle ones are evicted when needed)",
     "kv_pages_cached"),
    ("trimode_kv_pages_free", "KV pages nobody holds and no cache entry keeps", "kv_pages_free"),
)


class EngineCollector(Collector):
    """The engine's own counters and KV gauges, read at scrape time (an `EngineClient` sums its cores')."""

    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        for name, doc, key in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        for name, doc, key in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("trimode_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.generations = Counter("trimode_generations", "Generations finished (one per choice), by mode and "
                                   "finish reason", ["mode", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("trimode_prompt_tokens", "Prompt tokens processed", ["mode"], registry=r)
        self.generated_tokens = Counter("trimode_generated_tokens", "Tokens generated", ["mode"], registry=r)
        self.forward_passes = Counter("trimode_forward_passes", "Model forward passes, prefill included", ["mode"],
                                      registry=r)
        self.tokens_per_forward = Histogram("trimode_tokens_per_forward", "Generated tokens per forward pass, per "
                                            "generation", ["mode"], buckets=TPF_BUCKETS, registry=r)
        self.acceptance = Histogram("trimode_acceptance_length", "Tokens accepted per speculative cycle", ["mode"],
                                    buckets=ACCEPTANCE_BUCKETS, registry=r)
        self.latency = Histogram("trimode_request_latency_seconds", "Time from request to last byte, by endpoint "
                                 "and mode", ["endpoint", "mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("trimode_time_to_first_token_seconds", "Time from request to the first "
                                     "committed text, streaming requests", ["mode"], buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.rejected = Counter("trimode_requests_rejected", "Requests refused before generation, by reason",
                                ["reason"], registry=r)
        self.cancelled = Counter("trimode_requests_cancelled", "Generations abandoned because the client went away",
                                 registry=r)
        self.reviews = Counter("trimode_review_flags", "Routed requests flagged for human review, by route",
                               ["route"], registry=r)
        self.in_flight = Gauge("trimode_requests_in_flight", "HTTP generation requests being answered", registry=r,
                               multiprocess_mode="livesum")
        r.register(EngineCollector(engine_stats))
        self.exposed = r  # what a scrape reads: this registry, or every API server's files and our engine's stats
        if os.environ.get(MULTIPROC_ENV):
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)
            self.exposed.register(EngineCollector(engine_stats))

    def observe_generation(self, result: GenerationResult) -> None:
        s, mode = result.stats, result.mode
        self.generations.labels(mode, result.finish_reason).inc()
        self.prompt_tokens.labels(mode).inc(s.prompt_tokens)
        self.generated_tokens.labels(mode).inc(s.generated_tokens)
        self.forward_passes.labels(mode).inc(s.forward_passes)
        if s.forward_passes:
            self.tokens_per_forward.labels(mode).observe(s.tokens_per_forward)
        for accepted in s.acceptance:
            self.acceptance.labels(mode).observe(accepted)

    def exposition(self) -> bytes:
        return generate_latest(self.exposed)
