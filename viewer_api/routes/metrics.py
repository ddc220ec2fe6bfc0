"""`GET /metrics`: Prometheus exposition of the counters in `storage.metrics` and others,
this process's and, when the DICOM side runs in another process, that one's pocketpacs
metrics added in (the `process_` and `python_` ones describe this process alone)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from viewer_api.deps import Services, ServicesDep

router = APIRouter(tags=["operations"])


log = logging.getLogger("pocketpacs.http")

OURS = "pocketpacs_"


class _Sum(Collector):
    """The metric families of this process's exposition and the pocketpacs families of
    another's, each sample the sum of its values (counters, histograms and the spool
    gauge all add up across processes); the `_created` timestamps are left out, as they
    do not."""

    def __init__(self, local: str, other: str) -> None:
        self.local = local
        self.other = other

    def collect(self) -> Iterator[Metric]:
        # family name -> (its description, (sample name, labels) -> the sum)
        summed: dict[str, tuple[Metric, dict[tuple, float]]] = {}
        for text, only_ours in ((self.local, False), (self.other, True)):
            for family in text_string_to_metric_families(text):
                if only_ours and not family.name.startswith(OURS):
                    continue
                _, values = summed.setdefault(
                    family.name, (Metric(family.name, family.documentation, family.type), {})
                )
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    values[key] = values.get(key, 0.0) + sample.value
        for family, values in summed.values():
            for (sample_name, labels), value in values.items():
                family.add_sample(sample_name, dict(labels), value)
            if family.samples:
                yield family


def _exposition(services: Services) -> bytes:
    local = generate_latest()
    if services.dicom_side is None:
        return local
    try:
        other = services.dicom_side.metrics()
    except OSError as exc:  # this process's metrics still tell something
        log.warning("/metrics without the DICOM side's: %s", exc)
        return local
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Sum(local.decode(), other))
    return generate_latest(registry)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(services: ServicesDep) -> Response:
    body = await run_in_threadpool(_exposition, services)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
