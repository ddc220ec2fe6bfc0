"""Mixed load on one running archive (issue 6): modalities pushing over many associations,
clients searching and fetching thumbnails, phones opening a pocket film link, all at once.
Used by tests/test_load.py (a short run) and bench/load.py (the long one).

The modalities are DCMTK storescu processes (a real peer, and no Python client competing
for the GIL with the others); searchers and phones run in a process of their own each, so
one kind of client's work does not show up as another's latency."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


@dataclass
class LoadResult:
    stores: dict[str, int] = field(default_factory=dict)  # storescu runs by outcome
    store_errors: list[str] = field(default_factory=list)  # storescu runs that failed
    http: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    http_errors: list[str] = field(default_factory=list)  # requests that got no answer
    phone_opens: list[float] = field(default_factory=list)  # link to first thumbnail, s
    rss_mb: list[float] = field(default_factory=list)  # the archive's, once a second

    def summary(self) -> dict:
        opens = sorted(self.phone_opens)
        return {
            "c_store": dict(sorted(self.stores.items())),
            "storescu_failures": len(self.store_errors),
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
    """The archive's memory: `pocketpacs serve` and the HTTP process it spawned (not the
    embedded S3 server, a program of its own, nor multiprocessing's resource tracker)."""
    total = 0.0
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue  # a thread that ended meanwhile
    for member in pids:
        try:
            if member != pid and b"spawn_main" not in Path(f"/proc/{member}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue  # gone meanwhile
    return total


def _files(template: Dataset, folder: Path, count: int) -> list[Path]:
    """`count` instances of `template` in a new study, each with UIDs of its own, for one
    modality."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = template.copy()
    # A study of its own: the pocket film link is made for a finished study, not one
    # still arriving (that would re-render its thumbnails at every new slice).
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    paths = []
    for number in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _http_clients(
    kind: str, count: int, base: str, link: str, thumbnail: str, seconds: float, out
) -> None:
    """One process: `count` searchers or phones as threads for `seconds`; sends back what
    they saw."""
    result = LoadResult()
    lock = threading.Lock()
    stop = threading.Event()

    def fetch(client: httpx.Client, url: str) -> httpx.Response | None:
        try:
            response = client.get(url)
        except httpx.HTTPError as exc:
            with lock:
                result.http_errors.append(f"{url}: {exc}")
            return None
        with lock:
            result.http[response.status_code] = result.http.get(response.status_code, 0) + 1
        return response

    def searcher() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while not stop.is_set():
                fetch(client, "/dicomweb/studies?limit=10")
                fetch(client, thumbnail)

    def phone() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                answers = [fetch(client, link), fetch(client, f"{link}/study")]
                answers.append(fetch(client, f"{link}/series/0/thumbnail"))
                if all(a is not None and a.status_code == 200 for a in answers):
                    with lock:
                        result.phone_opens.append(time.monotonic() - started)
                for image in range(3):  # a few slices, as a patient swipes
                    fetch(client, f"{link}/series/0/images/{image}?size=512")
                stop.wait(1.0)  # then looks at them

    target = searcher if kind == "searchers" else phone
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    out.send(result)


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
    folder: Path,
    files_each: int = 200,
) -> LoadResult:
    """Run every kind of client for `seconds`; what each saw, and the archive's memory."""
    result = LoadResult()
    batches = [_files(template, folder / f"modality-{n}", files_each) for n in range(associations)]
    env = dict(os.environ, TCP_NODELAY="1")
    stop = threading.Event()

    def modality(number: int) -> None:
        """storescu, one association per run over this modality's files, again and again
        (a resent instance is a duplicate: answered success, stored once)."""
        while not stop.is_set():
            run = subprocess.run(
                [
                    "storescu",
                    "-aet",
                    f"LOAD{number:02d}",
                    "-aec",
                    "POCKETPACS",
                    "-to",
                    "60",
                    "-ta",
                    "60",
                    "-td",
                    "60",
                    "127.0.0.1",
                    str(dicom_port),
                    *map(str, batches[number]),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            failed = (run.stdout + run.stderr).count("Store Failed")
            key = "run ok" if run.returncode == 0 and not failed else f"exit {run.returncode}"
            result.stores[key] = result.stores.get(key, 0) + 1
            result.stores["instances"] = result.stores.get("instances", 0) + files_each
            if key != "run ok":
                result.store_errors.append((run.stdout + run.stderr)[-300:])

    def memory() -> None:
        while not stop.is_set():
            result.rss_mb.append(round(_rss_mb(pid), 1))
            stop.wait(1.0)

    context = multiprocessing.get_context("fork")
    pipes, processes = [], []
    for kind, count in (("searchers", searchers), ("phones", phones)):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_http_clients,
            args=(kind, count, http, link, thumbnail_path, seconds, send),
        )
        process.start()
        pipes.append(receive)
        processes.append(process)
    threads = [threading.Thread(target=memory)]
    threads += [threading.Thread(target=modality, args=(n,)) for n in range(associations)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for receive in pipes:
        seen: LoadResult = receive.recv()
        for status, number in seen.http.items():
            result.http[status] = result.http.get(status, 0) + number
        result.http_errors += seen.http_errors
        result.phone_opens += seen.phone_opens
    for process in processes:
        process.join(timeout=120)
    for thread in threads:
        thread.join(timeout=600)
    return result
