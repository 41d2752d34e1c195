"""Prometheus metrics of the gateway (the text format of moeserve.obs.prometheus).

Per HTTP request: requests by route and status, duration. Per generation request, when
its usage is recorded: requests by model and outcome (stop, length, tool_calls, aborted,
error), prompt / cached / completion / reasoning tokens, estimated cost, time to first
token, inter-token latency, end-to-end latency. Per scrape: requests in flight here, and
per engine replica its readiness, outstanding calls, and the running / waiting requests
and KV cache use it last reported (refreshed every --health-interval).
"""

from __future__ import annotations

from moeserve.obs.prometheus import CONTENT_TYPE, TOKEN_GAP_BUCKETS, Counter, Gauge, Histogram, Registry

from gateway.pool import EnginePool
from gateway.store import UsageRecord

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]


class GatewayMetrics(Registry):
    def __init__(self) -> None:
        p = "moeserve_gateway_"
        self.requests = Counter(p + "requests_total", "HTTP requests answered, by route and status code.")
        self.duration = Histogram(p + "request_duration_seconds", "Time from request to the end of the answer.")
        self.generations = Counter(p + "generation_requests_total",
                                   "Generation requests billed, by model and outcome (stop, length, tool_calls, "
                                   "aborted, error).")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request to the first generated token.")
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive token-carrying engine "
                                                                "messages of one choice.", TOKEN_GAP_BUCKETS)
        self.e2e = Histogram(p + "generation_duration_seconds", "Time from a generation request to its last token.")
        self.in_flight = Gauge(p + "requests_in_flight", "Generation requests being answered now.")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens billed, by model.")
        self.cached_tokens = Counter(p + "cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.")
        self.completion_tokens = Counter(p + "completion_tokens_total", "Completion tokens billed, by model.")
        self.reasoning_tokens = Counter(p + "reasoning_tokens_total", "Of completion tokens, reasoning.")
        self.cost = Counter(p + "estimated_cost_dollars_total", "Estimated cost of the answered requests, in dollars.")
        self.disconnects = Counter(p + "client_disconnects_total", "Generation requests whose client went away.")
        self.engine_ready = Gauge(p + "engine_ready", "1 while the engine replica is in the pool.")
        self.engine_outstanding = Gauge(p + "engine_outstanding_requests", "Requests in flight per engine replica.")
        self.engine_running = Gauge(p + "engine_running_requests", "Running requests an engine last reported.")
        self.engine_waiting = Gauge(p + "engine_waiting_requests", "Waiting requests an engine last reported.")
        self.engine_kv_usage = Gauge(p + "engine_kv_cache_usage_ratio", "KV cache use an engine last reported (0-1).")
        self.in_flight.set(0)

    def record_usage(self, rec: UsageRecord, token_gaps: list[float]) -> None:
        """A generation request's billed record; token_gaps in seconds (`Tally.token_gaps`)."""
        model = rec.model
        self.generations.inc(1, model=model, outcome=str(rec.outcome))
        self.prompt_tokens.inc(rec.prompt_tokens, model=model)
        self.cached_tokens.inc(rec.cached_prompt_tokens, model=model)
        self.completion_tokens.inc(rec.completion_tokens, model=model)
        self.reasoning_tokens.inc(rec.reasoning_tokens, model=model)
        self.cost.inc(rec.cost, model=model)
        if rec.ttft_ms is not None:
            self.ttft.observe(rec.ttft_ms / 1000, model=model)
        self.e2e.observe(rec.total_ms / 1000, model=model)
        for gap in token_gaps:
            self.itl.observe(gap, model=model)

    def render_pool(self, pool: EnginePool) -> str:
        for r in pool.replicas:
            self.engine_ready.set(int(r.ready), engine=r.address)
            self.engine_outstanding.set(r.outstanding, engine=r.address)
            if r.info is not None:
                kv = r.info.kv_cache
                self.engine_running.set(r.info.running_requests, engine=r.address)
                self.engine_waiting.set(r.info.waiting_requests, engine=r.address)
                self.engine_kv_usage.set(kv.used_blocks / kv.total_blocks if kv.total_blocks else 0.0,
                                         engine=r.address)
        return self.render()
