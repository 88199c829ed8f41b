"""The service's Prometheus metrics (/metrics): requests answered, seconds per query phase, queries
in flight, and the build served."""

from __future__ import annotations

from ..query.searcher import Searcher, summary


class Metrics:
    """The metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rayclip_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.query_seconds = Histogram(
            "rayclip_query_phase_seconds",
            "Seconds per query phase: encode (the model), search (FAISS), join (the mapping)",
            ["phase"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "rayclip_queries_in_flight", "Queries admitted and not yet answered", registry=self.registry
        )
        self.build = Gauge(
            "rayclip_build_info",
            "The build served (1 for the served one)",
            ["model_version", "build_id"],
            registry=self.registry,
        )
        self.vectors = Gauge("rayclip_index_vectors", "Vectors in the build served", registry=self.registry)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.query_seconds.labels(phase).observe(seconds)

    def exposition(self, searcher: Searcher | None) -> bytes:
        from prometheus_client import generate_latest

        if searcher is not None:
            info = summary(searcher)
            self.build.clear()
            self.build.labels(info["model_version"], info["build_id"]).set(1)
            self.vectors.set(info["count"])
        return generate_latest(self.registry)
