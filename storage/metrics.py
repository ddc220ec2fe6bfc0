"""Prometheus counters and histograms of the ingest path and the renderer, served by
`/metrics`."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

INSTANCES = Counter(
    "pocketpacs_instances_received_total",
    "Instances received, by route (cstore, import, stow) and outcome",
    ["route", "outcome"],
)
BYTES = Counter(
    "pocketpacs_bytes_received_total", "Bytes of instances accepted, by route", ["route"]
)
FAILURES = Counter(
    "pocketpacs_store_failures_total",
    "Instances refused, by DICOM status (0xA700 out of resources, 0xA900, 0xC000)",
    ["status"],
)
STORE_SECONDS = Histogram(
    "pocketpacs_store_seconds",
    "Time from a complete data set to its answer (spooled or stored), by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DUPLICATES_DIFFERING = Counter(
    "pocketpacs_duplicates_differing_total",
    "Instances sent again under a stored SOP Instance UID with different bytes (first kept)",
)
SPOOL_PENDING = Gauge("pocketpacs_spool_pending", "Instances accepted but not yet in the bucket")
SPOOL_DRAINED = Counter(
    "pocketpacs_spool_drained_total", "Spooled instances written to the bucket and index"
)
SPOOL_RETRIES = Counter(
    "pocketpacs_spool_retries_total", "Spool drain attempts that failed and will be retried"
)

RENDITIONS = Counter(
    "pocketpacs_renditions_total",
    "Rendered images served: 'rendered' (decoded now) or 'cached' (kept in the bucket)",
    ["source"],
)
THUMBNAILS_MADE = Counter(
    "pocketpacs_thumbnails_made_total", "Series thumbnails rendered ahead of time after ingest"
)


def observe_store(route: str, outcome, size: int, started: float) -> None:
    """Count one answered store; `outcome` is a `storage.ingest.StoreOutcome`."""
    INSTANCES.labels(route, outcome.name.lower()).inc()
    STORE_SECONDS.labels(route).observe(time.perf_counter() - started)
    if outcome.ok:
        BYTES.labels(route).inc(size)
    else:
        FAILURES.labels(f"0x{outcome.dimse_status:04X}").inc()
