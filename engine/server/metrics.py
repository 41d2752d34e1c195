"""Prometheus metrics of the engine, served over HTTP at /metrics (`--metrics-port`).

Per request (from `RequestRecord`, when its stream ends): requests by outcome, prompt,
completion and prefix-cache-hit tokens, time to first token, inter-token latency,
end-to-end and queue time. Per scrape (from the engine loop's latest `EngineStats`):
running and waiting requests and KV cache use. The prefix cache hit rate is
`rate(moeserve_engine_prefix_cache_hit_tokens_total) / rate(moeserve_engine_prefix_cache_query_tokens_total)`;
`moeserve_engine_prefix_cache_hit_ratio` gives it since the start.
"""

from __future__ import annotations

import logging

from aiohttp import web
from moeserve.obs.prometheus import CONTENT_TYPE, TOKEN_GAP_BUCKETS, Counter, Gauge, Histogram, Registry

from engine.core import EngineStats

from .observe import Outcome, RequestRecord

log = logging.getLogger(__name__)


class EngineMetrics(Registry):
    def __init__(self, model: str, total_blocks: int) -> None:
        p, self.model, self.total_blocks = "moeserve_engine_", model, total_blocks
        self.requests = Counter(p + "requests_total", "Requests ended, by outcome (stop, length, tool_calls, "
                                                       "cancelled, rejected, error).")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of the requests that ran.")
        self.completion_tokens = Counter(p + "completion_tokens_total", "Tokens generated, all choices.")
        self.cache_queries = Counter(p + "prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache.")
        self.cache_hits = Counter(p + "prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.")
        self.hit_ratio = Gauge(p + "prefix_cache_hit_ratio", "Prefix cache hits over lookups, since the start.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From the RPC's arrival to its first token.")
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between a request's consecutive token outputs.",
                             TOKEN_GAP_BUCKETS)
        self.e2e = Histogram(p + "request_duration_seconds", "From the RPC's arrival to the end of its stream.")
        self.queue = Histogram(p + "queue_time_seconds", "From entering the scheduler to the first batch.")
        self.running = Gauge(p + "running_requests", "Sequences in the running batch.")
        self.waiting = Gauge(p + "waiting_requests", "Sequences waiting to be scheduled.")
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Share of the KV cache's blocks in use (0 to 1).")
        self.update(EngineStats(0, 0, 0))

    def record(self, rec: RequestRecord) -> None:
        labels = {"model": self.model}
        self.requests.inc(1, outcome=str(rec.outcome), **labels)
        if rec.ttft is not None:
            self.ttft.observe(rec.ttft, **labels)
        for gap in rec.token_gaps:
            self.itl.observe(gap, **labels)
        if rec.outcome is not Outcome.REJECTED:
            self.e2e.observe(rec.duration, **labels)
        if rec.usage is not None:
            u = rec.usage
            self.prompt_tokens.inc(u.prompt_tokens, **labels)
            self.completion_tokens.inc(u.completion_tokens, **labels)
            self.cache_queries.inc(u.prompt_tokens, **labels)
            self.cache_hits.inc(u.cached_prompt_tokens, **labels)
        t = rec.timings
        if t is not None and t.scheduled_ns:
            self.queue.observe((t.scheduled_ns - t.queued_ns) / 1e9, **labels)

    def update(self, stats: EngineStats) -> None:
        labels = {"model": self.model}
        self.running.set(stats.running, **labels)
        self.waiting.set(stats.waiting, **labels)
        self.kv_usage.set(stats.used_blocks / self.total_blocks if self.total_blocks else 0.0, **labels)
        queried = self.cache_queries.values.get((("model", self.model),), 0)
        hits = self.cache_hits.values.get((("model", self.model),), 0)
        self.hit_ratio.set(hits / queried if queried else 0.0, **labels)


async def start_metrics_server(metrics: EngineMetrics, stats, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serves GET /metrics on host:port (0 picks a free port); stats() gives the latest EngineStats."""
    async def scrape(_request: web.Request) -> web.Response:
        metrics.update(stats())
        return web.Response(body=metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ValueError(f"--metrics-port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner, runner.addresses[0][1]
