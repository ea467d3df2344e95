"""Adapter tier metrics, on BentoML's /metrics (prometheus_client's default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

TIERS = ("gpu", "cpu", "disk")
"""Where an adapter is: a device slot (`gpu`, also on a CPU engine), host memory, or only on disk."""

LOADS = Counter(
    "bentoservice_adapter_loads",
    "Adapters loaded, by the tier they came from (disk: read into host memory; cpu: copied into a slot)",
    ["tier"],
)
EVICTIONS = Counter("bentoservice_adapter_evictions", "Adapters evicted, by the tier they left", ["tier"])
LOAD_SECONDS = Histogram(
    "bentoservice_adapter_load_seconds",
    "Time to load an adapter, by the tier it came from",
    ["tier"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUESTS = Counter(
    "bentoservice_adapter_requests", "Requests naming an adapter, by the tier it was in on arrival", ["tier"]
)
