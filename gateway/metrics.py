"""Prometheus metrics of the gateway, in the text exposition format (version 0.0.4).

https://prometheus.io/docs/instrumenting/exposition_formats/ -- counters, gauges and
histograms with labels, written by hand to keep the gateway's dependencies small.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from decimal import Decimal

from moeserve.engine.v1 import engine_pb2 as pb

from gateway.pool import EnginePool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float | Decimal) -> str:
    return repr(float(value)) if isinstance(value, (float, Decimal)) else str(value)


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_: str) -> None:
        self.name, self.help = name, help_
        self.values: dict[Labels, float | Decimal] = defaultdict(int)

    def inc(self, amount: float | Decimal = 1, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] += value

    def samples(self) -> list[str]:
        out = []
        for key, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip([*self.buckets, "+Inf"], counts, strict=True):
                running += count
                le = 'le="+Inf"' if bound == "+Inf" else f'le="{bound}"'
                out.append(f"{self.name}_bucket{_labels(key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(key)} {self.sums[key]!r}")
            out.append(f"{self.name}_count{_labels(key)} {running}")
        return out


class GatewayMetrics:
    def __init__(self) -> None:
        p = "moeserve_gateway_"
        self.requests = Counter(p + "requests_total", "HTTP requests answered, by route and status code.")
        self.duration = Histogram(p + "request_duration_seconds", "Time from request to the end of the answer.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request to the first generated output.")
        self.in_flight = Gauge(p + "requests_in_flight", "Generation requests being answered now.")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens billed, by model.")
        self.cached_tokens = Counter(p + "cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.")
        self.completion_tokens = Counter(p + "completion_tokens_total", "Completion tokens billed, by model.")
        self.reasoning_tokens = Counter(p + "reasoning_tokens_total", "Of completion tokens, reasoning.")
        self.cost = Counter(p + "estimated_cost_dollars_total", "Estimated cost of the answered requests, in dollars.")
        self.disconnects = Counter(p + "client_disconnects_total", "Generation requests whose client went away.")
        self.engine_ready = Gauge(p + "engine_ready", "1 while the engine replica is in the pool.")
        self.engine_outstanding = Gauge(p + "engine_outstanding_requests", "Requests in flight per engine replica.")
        self.in_flight.set(0)

    def record_usage(self, model: str, usage: pb.Usage, cost: Decimal) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens, model=model)
        self.cached_tokens.inc(usage.cached_prompt_tokens, model=model)
        self.completion_tokens.inc(usage.completion_tokens, model=model)
        self.reasoning_tokens.inc(usage.reasoning_tokens, model=model)
        self.cost.inc(cost, model=model)

    def render(self, pool: EnginePool) -> str:
        for r in pool.replicas:
            self.engine_ready.set(int(r.ready), engine=r.address)
            self.engine_outstanding.set(r.outstanding, engine=r.address)
        lines = []
        for metric in vars(self).values():
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}", *metric.samples()]
        return "\n".join(lines) + "\n"
