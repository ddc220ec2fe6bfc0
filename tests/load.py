"""Mixed load on one running archive (issue 6): modalities pushing over many associations,
clients searching and fetching thumbnails, phones opening a pocket film link, all at once.
Used by tests/test_load.py (a short run) and bench/load.py (the long one)."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage


@dataclass
class LoadResult:
    stores: dict[int, int] = field(default_factory=dict)  # DIMSE status -> count
    store_errors: list[str] = field(default_factory=list)  # associations that broke
    http: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    http_errors: list[str] = field(default_factory=list)  # requests that got no answer
    phone_opens: list[float] = field(default_factory=list)  # link to first thumbnail, s
    rss_mb: list[float] = field(default_factory=list)  # the archive's, once a second
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, table: dict[int, int], key: int) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1

    def summary(self) -> dict:
        opens = sorted(self.phone_opens)
        return {
            "c_store": dict(sorted(self.stores.items())),
            "association_errors": len(self.store_errors),
            "http": dict(sorted(self.http.items())),
            "http_errors": len(self.http_errors),
            "phone_opens": len(opens),
            "phone_open_median_s": round(statistics.median(opens), 3) if opens else None,
            "phone_open_p95_s": round(opens[int(len(opens) * 0.95)], 3) if opens else None,
            "rss_mb_first": self.rss_mb[0] if self.rss_mb else None,
            "rss_mb_peak": max(self.rss_mb) if self.rss_mb else None,
            "rss_mb_last": self.rss_mb[-1] if self.rss_mb else None,
        }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_load(
    *,
    pid: int,
    dicom_port: int,
    http: str,
    template: Dataset,
    link: str,
    seconds: float,
    associations: int,
    searchers: int,
    phones: int,
    thumbnail_path: str,
) -> LoadResult:
    """Run every kind of client for `seconds`; what each saw, and the archive's memory."""
    result = LoadResult()
    stop = threading.Event()

    def modality(number: int) -> None:
        ae = AE(ae_title=f"LOAD{number:02d}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage, str(template.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title="POCKETPACS")
        if not assoc.is_established:
            result.store_errors.append(f"association {number} not established")
            return
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        ds.SeriesInstanceUID = generate_uid()
        try:
            while not stop.is_set():
                uid = generate_uid()
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
                status = assoc.send_c_store(ds)
                result.count(result.stores, int(status.Status) if status else -1)
        except Exception as exc:  # a broken association is a finding, not a crash here
            result.store_errors.append(f"association {number}: {exc}")
        finally:
            if assoc.is_established:
                assoc.release()

    def fetch(client: httpx.Client, url: str) -> httpx.Response | None:
        try:
            response = client.get(url)
        except httpx.HTTPError as exc:
            result.http_errors.append(f"{url}: {exc}")
            return None
        result.count(result.http, response.status_code)
        return response

    def searcher() -> None:
        with httpx.Client(base_url=http, timeout=60) as client:
            while not stop.is_set():
                fetch(client, "/dicomweb/studies?limit=10")
                fetch(client, thumbnail_path)

    def phone() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                responses = [fetch(client, link), fetch(client, f"{link}/study")]
                responses.append(fetch(client, f"{link}/series/0/thumbnail"))
                if all(r is not None and r.status_code == 200 for r in responses):
                    with result.lock:
                        result.phone_opens.append(time.monotonic() - started)
                for image in range(3):  # a few slices, as a patient swipes
                    fetch(client, f"{link}/series/0/images/{image}?size=512")
                stop.wait(1.0)  # then looks at them

    def memory() -> None:
        while not stop.is_set():
            result.rss_mb.append(round(_rss_mb(pid), 1))
            stop.wait(1.0)

    workers = [threading.Thread(target=memory)]
    workers += [threading.Thread(target=modality, args=(n,)) for n in range(associations)]
    workers += [threading.Thread(target=searcher) for _ in range(searchers)]
    workers += [threading.Thread(target=phone) for _ in range(phones)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
    return result
