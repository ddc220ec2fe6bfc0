#!/usr/bin/env python
"""C-FIND and QIDO-RS latency: pocketpacs against Orthanc (Debian, 1.10) on the same
corpus in the same run, then pocketpacs on a 1,000,000-instance index, SQLite beside
PostgreSQL.

    .venv/bin/python bench/query.py             # full corpus + 1M index (about 10 min)
    .venv/bin/python bench/query.py --quick     # 199-instance corpus subset, 20 repetitions
    .venv/bin/python bench/query.py --skip-million    # only the comparison with Orthanc

See bench/README.md ("Query latency") for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bigindex
import httpx
from corpus import SERIES, Corpus, CorpusFile, SeriesSpec, uid
from findclient import FindError, LeanFindClient
from findfloor import FindFloor, request_key
from ingest import WORK, capture, environment, storescu
from pydicom.dataset import Dataset
from query_report import report
from servers import BenchError, Orthanc, Pocketpacs, Server, build_shim, free_port

CALLING_AE = "BENCHFIND"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# One extra CT series of exactly 100 instances, for image-level searches with 100 matches.
Q100 = SeriesSpec("ct-q100", "ct", "BENCHQ100", "q100-study", 100, 100)
CORPUS_DATES = "20240101-20241231"  # every corpus study is of 20240611
CORPUS_PATIENT = "BENCHCT1"
CORPUS_NAMES = "Bench^BENCHCT*"  # BENCHCT0-3 and BENCHCTC: five patients, five studies
STUDY_RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "StudyInstanceUID",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
IMAGE_RETURN_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
# C-FIND asks for the same minus Rows and Columns (VR US): pocketpacs could not encode
# those in a C-FIND response before commit f57292b, and the whole search then failed with
# 0xC312. `unsigned_keys_check` asks for them once and reports what each server answers.
CFIND_IMAGE_RETURN_KEYS = tuple(k for k in IMAGE_RETURN_KEYS if k not in ("Rows", "Columns"))


def log(message: str) -> None:
    print(message, flush=True)


# what is asked ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One search, asked the same way of every server: a C-FIND identifier, or a QIDO-RS
    path under the DICOMweb root with its query parameters."""

    key: str
    title: str
    protocol: str  # "C-FIND" or "QIDO-RS"
    level: str  # "STUDY" or "IMAGE"
    match: dict[str, str]
    expected: int
    target: str = ""  # "le-orthanc", "quarter-orthanc", "under-20ms" or ""

    def identifier(self, image_keys: tuple[str, ...] = CFIND_IMAGE_RETURN_KEYS) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        for keyword in STUDY_RETURN_KEYS if self.level == "STUDY" else image_keys:
            setattr(ds, keyword, None)  # an empty element: return this key
        for keyword, value in self.match.items():
            setattr(ds, keyword, value)
        return ds

    def qido(self) -> tuple[str, dict[str, str]]:
        if self.level == "STUDY":
            return "/studies", dict(self.match)
        params = dict(self.match)
        study, series = params.pop("StudyInstanceUID"), params.pop("SeriesInstanceUID")
        return f"/studies/{study}/series/{series}/instances", params

    def tools_find(self) -> dict:
        """The same search as Orthanc's own REST /tools/find (without the DICOMweb plugin)."""
        level = "Study" if self.level == "STUDY" else "Instance"
        return {"Level": level, "Query": dict(self.match), "Expand": True}


def both_protocols(
    key: str, title: str, level: str, match: dict[str, str], expected: int, target: str
) -> list[Probe]:
    return [
        Probe(f"cfind-{key}", title, "C-FIND", level, match, expected, target),
        Probe(f"qido-{key}", title, "QIDO-RS", level, match, expected, target),
    ]


def corpus_probes(files: list[CorpusFile]) -> list[Probe]:
    """The four searches of the comparison with Orthanc, with their expected matches."""
    studies = {spec.study for spec in SERIES} | {Q100.study}
    ct_patients = {s.study for s in (*SERIES, Q100) if s.patient.startswith("BENCHCT")}
    image = {
        "StudyInstanceUID": uid("study", Q100.study),
        "SeriesInstanceUID": uid("series", Q100.name),
    }
    assert sum(f.series == Q100.name for f in files) == 100
    return [
        *both_protocols(
            "study-patientid",
            f"study by PatientID ({CORPUS_PATIENT})",
            "STUDY",
            {"PatientID": CORPUS_PATIENT},
            1,
            "le-orthanc",
        ),
        *both_protocols(
            "study-date",
            f"study by StudyDate range ({CORPUS_DATES})",
            "STUDY",
            {"StudyDate": CORPUS_DATES},
            len(studies),
            "le-orthanc",
        ),
        *both_protocols(
            "study-name",
            f"study by PatientName wildcard ({CORPUS_NAMES})",
            "STUDY",
            {"PatientName": CORPUS_NAMES},
            len(ct_patients),
            "le-orthanc",
        ),
        *both_protocols(
            "image-100", "image level, one series of 100", "IMAGE", image, 100, "quarter-orthanc"
        ),
    ]


def million_probes(found: dict) -> list[Probe]:
    """The searches on the 1,000,000-instance index (values from bigindex.probes)."""
    image = {
        "StudyInstanceUID": found["image_study_uid"],
        "SeriesInstanceUID": found["image_series_uid"],
    }
    pid = found["patient_id"]
    return [
        *both_protocols(
            "study-patientid",
            f"study by PatientID ({pid})",
            "STUDY",
            {"PatientID": pid},
            found["patient_studies_own"],
            "under-20ms",
        ),
        *both_protocols(
            "study-patientid-issuer",
            f"study by PatientID + IssuerOfPatientID ({pid}, {bigindex.ISSUER})",
            "STUDY",
            {"PatientID": pid, "IssuerOfPatientID": bigindex.ISSUER},
            found["patient_studies_all"],
            "under-20ms",
        ),
        *both_protocols(
            "study-date",
            f"study by StudyDate range ({found['date_range']})",
            "STUDY",
            {"StudyDate": found["date_range"]},
            found["date_range_studies"],
            "",
        ),
        *both_protocols(
            "study-name",
            f"study by PatientName wildcard ({found['name_pattern']})",
            "STUDY",
            {"PatientName": found["name_pattern"]},
            found["name_studies"],
            "",
        ),
        *both_protocols(
            "image-100",
            "image level, one series of 100",
            "IMAGE",
            image,
            found["image_instances"],
            "",
        ),
    ]


# how it is asked -----------------------------------------------------------------------------


class FindClient:
    """One lean C-FIND association per server (`findclient.py`), kept open for the run."""

    def __init__(self, port: int, called_ae: str) -> None:
        try:
            self.client = LeanFindClient(port, called_ae, CALLING_AE)
        except (OSError, FindError) as exc:
            raise BenchError(f"C-FIND association to {called_ae}@{port}: {exc}") from exc

    def find(self, identifier: Dataset) -> int:
        """Matches received; raises on any status but pending and success."""
        try:
            return self.client.find(identifier)
        except (OSError, FindError) as exc:
            raise BenchError(f"C-FIND: {exc}") from exc

    def close(self) -> None:
        self.client.close()


@dataclass
class Endpoint:
    """A server as the client sees it: its C-FIND association and its HTTP client."""

    name: str
    server: Server
    # "/dicomweb", "/dicom-web", "" for Orthanc's /tools/find, None: no HTTP (C-FIND only)
    qido_root: str | None
    find: FindClient | None = None
    http: httpx.Client | None = None
    identifiers: dict[str, Dataset] = field(default_factory=dict)

    def open(self) -> None:
        self.find = FindClient(self.server.dicom_port, self.server.ae_title)
        if self.qido_root is not None:
            self.http = httpx.Client(
                base_url=f"http://127.0.0.1:{self.server.http_port}", timeout=120
            )

    def answers(self, probe: Probe) -> bool:
        return probe.protocol == "C-FIND" or self.qido_root is not None

    def close(self) -> None:
        if self.find is not None:
            self.find.close()
            self.find = None
        if self.http is not None:
            self.http.close()
            self.http = None

    def ask(self, probe: Probe) -> tuple[float, int]:
        """(milliseconds from sending to the last byte of the answer, matches)."""
        assert self.find is not None
        if probe.protocol == "C-FIND":
            identifier = self.identifiers.setdefault(probe.key, probe.identifier())
            started = time.perf_counter()
            matches = self.find.find(identifier)
            return (time.perf_counter() - started) * 1000, matches
        assert self.http is not None
        if self.qido_root:
            path, params = probe.qido()
            if params:
                # "^" and "*" as they are: Orthanc 1.10 does not percent-decode %5E.
                path += "?" + urlencode(params, safe="^*")
            started = time.perf_counter()
            response = self.http.get(self.qido_root + path)
        else:
            started = time.perf_counter()
            response = self.http.post("/tools/find", json=probe.tools_find())
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise BenchError(
                f"{self.name} {probe.key}: HTTP {response.status_code} {response.text[:200]}"
            )
        body = response.json() if response.content else []
        return elapsed, len(body)


def unsigned_keys_check(endpoints: list[Endpoint], probe: Probe) -> dict[str, str]:
    """An image-level C-FIND that also asks for Rows and Columns (VR US), once per server:
    what each answers. Kept out of the timed probes because pocketpacs fails it."""
    identifier = probe.identifier(IMAGE_RETURN_KEYS)
    found = {}
    for endpoint in endpoints:
        assert endpoint.find is not None
        try:
            found[endpoint.name] = f"{endpoint.find.find(identifier)} matches"
        except BenchError as exc:
            found[endpoint.name] = str(exc).splitlines()[0]
    return found


def association_setup(endpoints: list[Endpoint], repeats: int, warmup: int = 3) -> dict:
    """Milliseconds from A-ASSOCIATE-RQ to an established association (one Study Root
    FIND context proposed), in alternation: what a client pays that opens an association
    for each search, as findscu and many viewers do."""
    samples: dict[str, list[float]] = {e.name: [] for e in endpoints}
    for turn in range(warmup + repeats):
        for endpoint in endpoints if turn % 2 == 0 else endpoints[::-1]:
            started = time.perf_counter()
            client = FindClient(endpoint.server.dicom_port, endpoint.server.ae_title)
            elapsed = (time.perf_counter() - started) * 1000
            client.close()
            if turn >= warmup:
                samples[endpoint.name].append(elapsed)
    return {name: summarize(values) for name, values in samples.items()}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of the values at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(values: list[float]) -> dict:
    if not values:
        return {}
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 2),
        "p95_ms": round(percentile(values, 0.95), 2),
        "min_ms": round(min(values), 2),
        "mean_ms": round(statistics.fmean(values), 2),
    }


def measure(endpoints: list[Endpoint], probes: list[Probe], repeats: int, warmup: int) -> dict:
    """Warm-ups, then `repeats` rounds; each round asks every probe of every endpoint,
    the endpoints' order swapped every time (A B, B A, ...), so that drift on the shared
    machine hits them alike."""
    samples: dict[str, dict[str, list[float]]] = {
        p.key: {e.name: [] for e in endpoints} for p in probes
    }
    counts: dict[str, dict[str, list[int]]] = {
        p.key: {e.name: [] for e in endpoints} for p in probes
    }
    turn = 0
    for rounds, keep in ((warmup, False), (repeats, True)):
        for _ in range(rounds):
            for probe in probes:
                order = endpoints if turn % 2 == 0 else endpoints[::-1]
                turn += 1
                for endpoint in order:
                    if not endpoint.answers(probe):
                        continue
                    elapsed, matches = endpoint.ask(probe)
                    counts[probe.key][endpoint.name].append(matches)
                    if keep:
                        samples[probe.key][endpoint.name].append(elapsed)
    results = {}
    for probe in probes:
        row: dict = {
            "title": probe.title,
            "protocol": probe.protocol,
            "level": probe.level,
            "match": probe.match,
            "expected": probe.expected,
            "target": probe.target,
            "servers": {},
        }
        problems = []
        for endpoint in endpoints:
            if not endpoint.answers(probe):
                continue
            seen = sorted(set(counts[probe.key][endpoint.name]))
            row["servers"][endpoint.name] = {
                **summarize(samples[probe.key][endpoint.name]),
                "matches": seen,
                "samples_ms": [round(v, 3) for v in samples[probe.key][endpoint.name]],
            }
            if seen != [probe.expected]:
                problems.append(
                    f"{endpoint.name} returned {seen} matches, {probe.expected} expected"
                )
        if problems:
            row["error"] = "; ".join(problems)
        results[probe.key] = row
    return results


# phase 1: pocketpacs against Orthanc --------------------------------------------------------


def orthanc_dicomweb() -> bool:
    return Path(DICOMWEB_PLUGIN).exists()


def start_orthanc(run_dir: Path, log_dir: Path, shim: Path) -> Orthanc:
    """Orthanc with C-FIND allowed from any caller, and the DICOMweb plugin when installed."""
    orthanc = Orthanc("orthanc", run_dir / "orthanc", log_dir / "orthanc.log")
    plugins, extra = [], {"DicomAlwaysAllowFind": True}
    if orthanc_dicomweb():
        plugins.append(DICOMWEB_PLUGIN)
        extra["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
    orthanc.start(shim, plugins, extra)
    return orthanc


def load_servers(
    pocketpacs: Pocketpacs, orthanc: Orthanc, files: list[CorpusFile], root: Path, log_dir: Path
) -> dict:
    """The corpus into both servers with storescu (4 associations), counts checked."""
    loaded = {}
    for server in (pocketpacs, orthanc):
        sent = storescu(files, root, server, 4, log_dir, f"load-{server.name}")
        if any(sent["codes"]) or sent["messages"]:
            raise BenchError(f"storescu into {server.name}: {sent['codes']} {sent['messages'][:3]}")
        loaded[server.name] = {"send_s": round(sent["finished"] - sent["started"], 1)}
    pocketpacs.wait_durable()
    for server in (pocketpacs, orthanc):
        count = server.instance_count()
        loaded[server.name]["instances"] = count
        if count != len(files):
            raise BenchError(f"{server.name} holds {count} instances, {len(files)} sent")
    return loaded


def compare_with_orthanc(args, shim: Path, data: dict, save: Callable[[], None]) -> None:
    corpus = Corpus(WORK / "corpus")
    files = corpus.ensure(args.quick, log=log) + corpus.ensure_series(Q100, log=log)
    log(f"  {len(files)} instances ({sum(f.size for f in files) / 1e6:.0f} MB)")
    probes = corpus_probes(files)
    run_dir = WORK / "runs" / "query-compare"
    shutil.rmtree(run_dir, ignore_errors=True)
    pocketpacs = Pocketpacs("pocketpacs", run_dir / "pocketpacs", args.log_dir / "pocketpacs.log")
    orthanc = start_orthanc(run_dir, args.log_dir, shim)
    floor = FindFloor("pynetdicom-floor", run_dir / "floor", args.log_dir / "floor.log")
    wide = FindFloor("pynetdicom-floor-177", run_dir / "wide", args.log_dir / "floor-177.log")
    endpoints: list[Endpoint] = []
    section: dict = {
        "instances": len(files),
        "orthanc_qido": "DICOMweb plugin" if orthanc_dicomweb() else "REST /tools/find",
        "orthanc_dicomweb": capture(["dpkg-query", "-W", "-f", "${Version}", "orthanc-dicomweb"]),
    }
    data["compare"] = section
    try:
        pocketpacs.start()
        finds = [p for p in probes if p.protocol == "C-FIND"]
        answers = {request_key(p.identifier()): p.expected for p in finds}
        floor.start(answers, free_port())
        wide.start(answers, free_port(), all_contexts=True)
        for server in (pocketpacs, orthanc, floor, wide):
            server.wait_ready()
        log("  sending the corpus to both servers ...")
        section["loaded"] = load_servers(pocketpacs, orthanc, files, corpus.root, args.log_dir)
        endpoints = [
            Endpoint("pocketpacs", pocketpacs, "/dicomweb"),
            Endpoint("orthanc", orthanc, "/dicom-web" if orthanc_dicomweb() else ""),
            Endpoint("pynetdicom-floor", floor, None),
        ]
        for endpoint in endpoints:
            endpoint.open()
        image_probe = next(p for p in probes if p.key == "cfind-image-100")
        section["unsigned_keys_check"] = unsigned_keys_check(endpoints[:2], image_probe)
        log(f"  C-FIND image level with Rows, Columns: {section['unsigned_keys_check']}")
        # The failed search may have ended the association: start the measurements afresh.
        for endpoint in endpoints:
            endpoint.close()
            endpoint.open()
        contexts = [*endpoints, Endpoint(wide.name, wide, None)]
        section["association"] = association_setup(contexts, max(10, args.repeats // 2))
        log(f"  association set-up: {section['association']}")
        section["load_before"] = round(os.getloadavg()[0], 2)
        log(f"  measuring: {args.warmup} warm-ups, {args.repeats} rounds of {len(probes)} probes")
        section["results"] = measure(endpoints, probes, args.repeats, args.warmup)
        section["load_after"] = round(os.getloadavg()[0], 2)
        for key, row in section["results"].items():
            log("  " + line(key, row))
        index_url = f"sqlite:///{pocketpacs.data_dir / 'index.sqlite3'}"
        section["in_process"] = in_process(index_url, probes, 20)
    except Exception as exc:
        section["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  ERROR: {section['error']}")
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for server in (pocketpacs, orthanc, floor, wide):
            server.stop()
        if not args.keep_data:
            shutil.rmtree(run_dir, ignore_errors=True)
        save()


# phase 2: pocketpacs on 1,000,000 instances ----------------------------------------------------


def explain(url: str, probes: list[Probe]) -> dict[str, list[str]]:
    """The query plan of the SQL pocketpacs runs for each probe (its own statement builder,
    for an `--open` caller), EXPLAIN ANALYZE on PostgreSQL."""
    from sqlalchemy import text

    from storage.index import Index
    from storage.query import Query, QueryLevel, Viewer, _select

    index = Index(url)
    plans: dict[str, list[str]] = {}
    try:
        with index.engine.connect() as connection:
            for probe in probes:
                if probe.protocol != "QIDO-RS":
                    continue
                keys = dict.fromkeys(
                    STUDY_RETURN_KEYS if probe.level == "STUDY" else IMAGE_RETURN_KEYS, ""
                )
                keys.update(probe.match)
                query = Query(QueryLevel[probe.level], keys)
                statement, params = _select(query, Viewer(bigindex.OPEN_INSTITUTION))
                sql = str(
                    statement.params(params).compile(
                        index.engine, compile_kwargs={"literal_binds": True}
                    )
                )
                prefix = "EXPLAIN QUERY PLAN " if index.is_sqlite else "EXPLAIN ANALYZE "
                rows = connection.execute(text(prefix + sql)).all()
                if index.is_sqlite:
                    plans[probe.key] = [str(row[-1]) for row in rows]
                else:
                    plans[probe.key] = [str(row[0]) for row in rows]
    except Exception as exc:  # the plans are a diagnosis, never a reason to fail the run
        plans["error"] = [f"{type(exc).__name__}: {exc}"]
    finally:
        index.dispose()
    return plans


def in_process(url: str, probes: list[Probe], repeats: int) -> dict[str, dict]:
    """storage.query.search called directly: the index's share of each search's time."""
    from storage.audit import AuditEntry, AuditLog
    from storage.index import Index
    from storage.query import Query, QueryLevel, Viewer, search

    index = Index(url)
    found: dict[str, dict] = {}
    try:
        for probe in probes:
            if probe.protocol != "QIDO-RS":
                continue
            keys = dict.fromkeys(
                STUDY_RETURN_KEYS if probe.level == "STUDY" else IMAGE_RETURN_KEYS, ""
            )
            keys.update(probe.match)
            query = Query(QueryLevel[probe.level], keys)
            viewer = Viewer(bigindex.OPEN_INSTITUTION)
            values = []
            for number in range(repeats + 3):
                started = time.perf_counter()
                search(index, query, viewer)
                if number >= 3:
                    values.append((time.perf_counter() - started) * 1000)
            found[probe.key.removeprefix("qido-")] = summarize(values)
        # Every search also writes one audit row, in the same database.
        audit = AuditLog(index)
        values = []
        for number in range(repeats + 3):
            entry = AuditEntry(actor="bench", action="query", outcome="ok", resource="bench")
            started = time.perf_counter()
            audit.record(entry)
            if number >= 3:
                values.append((time.perf_counter() - started) * 1000)
        found["audit record (1 row)"] = summarize(values)
    finally:
        index.dispose()
    return found


def million(args, data: dict, save: Callable[[], None]) -> None:
    section: dict = {"backends": {}}
    data["million"] = section
    run_dir = WORK / "runs" / "query-million"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    plan = bigindex.make_plan()
    found = bigindex.probes(plan)
    section["shape"] = {
        "patients": bigindex.PATIENTS,
        "studies": len(plan.studies),
        "series": plan.series_count,
        "instances": plan.instance_count,
        "institutions": dict(bigindex.INSTITUTIONS),
        "plan_s": round(time.monotonic() - started, 1),
    }
    section["probes"] = found
    probes = million_probes(found)
    servers: dict[str, Pocketpacs] = {}
    urls: dict[str, str] = {}
    database = ""
    endpoints: list[Endpoint] = []
    try:
        for backend in args.backends:
            log(f"  loading 1,000,000 instances into {backend} ...")
            if backend == "sqlite":
                path = run_dir / backend / "data" / "index.sqlite3"
                section["backends"][backend] = bigindex.load_sqlite(path, plan, log=log)
                urls[backend] = f"sqlite:///{path}"
            else:
                database = bigindex.create_pg_database()
                section["backends"][backend] = {"database": database}
                section["backends"][backend].update(
                    bigindex.load_postgresql(database, plan, log=log)
                )
                urls[backend] = bigindex.pg_url(database)
            save()
        for backend in args.backends:
            server = Pocketpacs(backend, run_dir / backend, args.log_dir / f"million-{backend}.log")
            servers[backend] = server
            # SQLite: the data directory's index.sqlite3, as when no URL is set.
            server.start({} if backend == "sqlite" else {"POCKETPACS_DATABASE_URL": urls[backend]})
            server.wait_ready(timeout=300)
            section["backends"][backend]["ready_s"] = round(server.ready_seconds, 1)
        endpoints = [Endpoint(name, server, "/dicomweb") for name, server in servers.items()]
        for endpoint in endpoints:
            endpoint.open()
        section["load_before"] = round(os.getloadavg()[0], 2)
        log(f"  measuring: {args.warmup} warm-ups, {args.repeats} rounds of {len(probes)} probes")
        section["results"] = measure(endpoints, probes, args.repeats, args.warmup)
        section["load_after"] = round(os.getloadavg()[0], 2)
        for key, row in section["results"].items():
            log("  " + line(key, row))
        for endpoint in endpoints:
            endpoint.close()
        endpoints = []
        for backend, url in urls.items():
            section["backends"][backend]["in_process"] = in_process(url, probes, 20)
            section["backends"][backend]["plans"] = explain(url, probes)
    except Exception as exc:
        section["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  ERROR: {section['error']}")
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for server in servers.values():
            server.stop()
        if database:
            bigindex.drop_pg_database(database)
        if not args.keep_data:
            shutil.rmtree(run_dir, ignore_errors=True)
        save()


# main ---------------------------------------------------------------------------------------


def line(key: str, row: dict) -> str:
    parts = [f"{key:<30}"]
    for name, s in row["servers"].items():
        parts.append(f"{name} {s.get('median_ms', '-')} / p95 {s.get('p95_ms', '-')} ms")
    if row.get("error"):
        parts.append(f"ERROR: {row['error']}")
    return " | ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="199-instance corpus subset")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 100, quick 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--skip-compare", action="store_true", help="no Orthanc comparison")
    parser.add_argument("--skip-million", action="store_true", help="no 1,000,000-instance index")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="for the 1M index (default both)"
    )
    parser.add_argument("--results", type=Path, help="markdown report path")
    parser.add_argument("--keep-data", action="store_true", help="keep bench/work/runs/query-*")
    parser.add_argument("--report-from", type=Path, help="rewrite the report from a saved JSON")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 20 if args.quick else 100
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}")
    if args.results is None:
        args.results = WORK / "RESULTS-query-quick.md" if args.quick else BENCH_RESULTS
    return args


BENCH_RESULTS = Path(__file__).resolve().parent / "RESULTS-query.md"


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        args.results.write_text(report(json.loads(args.report_from.read_text())))
        log(f"wrote {args.results}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.log_dir = WORK / "logs" / f"query-{stamp}"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    json_path = WORK / "results" / f"query-{stamp}{'-quick' if args.quick else ''}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "environment": environment(),
    }
    data["environment"]["postgresql"] = capture(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc", "SHOW server_version"]
    )
    data["environment"]["orthanc_dicomweb"] = capture(
        ["dpkg-query", "-W", "-f", "${Version}", "orthanc-dicomweb"]
    )

    def save() -> None:
        data["wall_s"] = round(time.monotonic() - began, 1)
        json_path.write_text(json.dumps(data, indent=1))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report(data))

    log(f"pocketpacs query benchmark, logs in {args.log_dir}")
    try:
        if not args.skip_compare:
            for tool in ("storescu", "/usr/sbin/Orthanc"):
                if not shutil.which(tool):
                    raise SystemExit(f"{tool} not found")
            if not orthanc_dicomweb():
                log("  Orthanc's DICOMweb plugin is missing (apt-get install orthanc-dicomweb):")
                log("  QIDO-RS is compared with Orthanc's REST /tools/find instead")
            log("pocketpacs against Orthanc ...")
            compare_with_orthanc(args, build_shim(WORK), data, save)
        if not args.skip_million:
            log("pocketpacs on 1,000,000 instances ...")
            million(args, data, save)
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        save()
        return 130
    save()
    log(f"wrote {args.results} and {json_path} ({(time.monotonic() - began) / 60:.1f} min)")
    failed = [
        f"{name}: {section['error']}"
        for name in ("compare", "million")
        if (section := data.get(name)) and section.get("error")
    ]
    failed += [
        f"{name} {key}: {row['error']}"
        for name in ("compare", "million")
        for key, row in (data.get(name) or {}).get("results", {}).items()
        if row.get("error")
    ]
    for problem in failed:
        log(f"FAILED {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
