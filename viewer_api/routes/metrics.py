"""`GET /metrics`: Prometheus exposition of the counters in `storage.metrics` and others,
this process's and, when the DICOM side runs in another process, that one's added in."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from viewer_api.deps import Services, ServicesDep

router = APIRouter(tags=["operations"])


class _Sum(Collector):
    """The metric families of several expositions, each sample the sum of its values
    (counters, histograms and the spool gauge all add up across processes); the
    `_created` timestamps are left out, as they do not."""

    def __init__(self, *expositions: str) -> None:
        self.expositions = expositions

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple, float]] = {}
        for text in self.expositions:
            for family in text_string_to_metric_families(text):
                known = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                summed = values.setdefault(known.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    summed[key] = summed.get(key, 0.0) + sample.value
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            if family.samples:
                yield family


def _exposition(services: Services) -> bytes:
    local = generate_latest()
    if services.dicom_side is None:
        return local
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Sum(local.decode(), services.dicom_side.metrics()))
    return generate_latest(registry)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(services: ServicesDep) -> Response:
    body = await run_in_threadpool(_exposition, services)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
