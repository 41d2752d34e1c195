"""Prometheus metrics in the text exposition format (version 0.0.4), shared by the engine
and the gateway.

https://prometheus.io/docs/instrumenting/exposition_formats/ -- counters, gauges and
histograms with labels, written by hand to keep both services' dependencies small. A
`Registry` renders every metric it holds; names follow Prometheus' conventions (a unit
suffix such as `_seconds`, `_total` on counters).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from decimal import Decimal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Inter-token latency: a decode step takes milliseconds, so finer buckets at the low end.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)

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


class Registry:
    """Metrics rendered together: every Counter, Gauge and Histogram attribute of a subclass."""

    def metrics(self) -> list[Counter | Histogram]:
        return [m for m in vars(self).values() if isinstance(m, (Counter, Histogram))]

    def render(self) -> str:
        lines = []
        for metric in self.metrics():
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}", *metric.samples()]
        return "\n".join(lines) + "\n"
