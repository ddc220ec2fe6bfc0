#!/usr/bin/env python
"""Rendered-image latency: pocketpacs against Orthanc (Debian, 1.10, DICOMweb plugin) on
the same instances in the same run.

    .venv/bin/python bench/render.py                 # 20 instances a group (about 4 min)
    .venv/bin/python bench/render.py --per-group 5   # a quick look

For each group of the bench corpus (CT native, RLE, JPEG-LS, JPEG 2000, MR, CR 2500x2048,
US multi-frame), every chosen instance is rendered as JPEG: first by pocketpacs cold (no
rendition kept yet), then again (cached), by Orthanc's DICOMweb `/rendered` twice (Orthanc
keeps nothing: both are renderings) and by Orthanc's own `/instances/{id}/preview`. Each
request is timed by the client from sending to the last byte, one keep-alive connection
per server (the standard library's `http.client`: see `KeepAlive`). US multi-frame: frames
1 to 10 of each instance, each a cold rendering.
See bench/README.md ("Rendering latency").
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from corpus import Corpus, CorpusFile
from ingest import WORK, environment, storescu, write_results
from pydicom import dcmread
from query import start_orthanc
from servers import BenchError, Pocketpacs, build_shim

BENCH = Path(__file__).resolve().parent
# Group -> (corpus kind, transfer syntax).
GROUPS = {
    "CT": ("ct", "1.2.840.10008.1.2.1"),
    "CT RLE": ("ct", "1.2.840.10008.1.2.5"),
    "CT JPEG-LS": ("ct", "1.2.840.10008.1.2.4.80"),
    "CT JPEG 2000": ("ct", "1.2.840.10008.1.2.4.90"),
    "MR": ("mr", "1.2.840.10008.1.2.1"),
    "CR 2500x2048": ("cr", "1.2.840.10008.1.2.1"),
    "US multi-frame": ("us", "1.2.840.10008.1.2.1"),
}
US_FRAMES = 10
JPEG = {"Accept": "image/jpeg"}


def log(message: str) -> None:
    print(message, flush=True)


def choose(files: list[CorpusFile], per_group: int) -> dict[str, list[CorpusFile]]:
    """Up to `per_group` instances of each group, spread over its series."""
    chosen = {}
    for group, (kind, syntax) in GROUPS.items():
        members = [f for f in files if f.kind == kind and f.syntax == syntax]
        step = max(1, len(members) // per_group)
        chosen[group] = members[::step][:per_group]
    return chosen


def uids(file: CorpusFile) -> tuple[str, str, str]:
    ds = dcmread(file.path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


class KeepAlive:
    """One keep-alive HTTP/1.1 connection to a server, for timing. Not httpx: its own
    work per request was 0.4 ms of a bare uvicorn answer's 0.7, and 0.9 of 1.8 after a
    10 ms pause (what a server sees between these requests), which the figures of both
    servers carried; the standard library's client costs a third of that."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> tuple[int, bytes]:
        """The answer's status and body; once more on a new connection when the server
        closed the idle one (the retry is in the time measured, and rare)."""
        for attempt in (1, 2):
            try:
                self.connection.request("GET", path, headers=JPEG)
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionError):
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def timed(client: KeepAlive, url: str) -> tuple[float, int]:
    started = time.perf_counter()
    status, body = client.get(url)
    elapsed = (time.perf_counter() - started) * 1000
    if status == 200 and not body.startswith(b"\xff\xd8"):
        raise BenchError(f"{url}: 200 but not a JPEG")
    return elapsed, status


def measure(
    pocketpacs: KeepAlive,
    orthanc: KeepAlive,
    lookup: httpx.Client,
    chosen: dict[str, list[CorpusFile]],
) -> dict:
    results: dict[str, dict] = {}
    for group, files in chosen.items():
        samples: dict[str, list[float]] = {
            "pocketpacs_cold": [],
            "pocketpacs_cached": [],
            "orthanc_rendered": [],
            "orthanc_preview": [],
        }
        failures: dict[str, int] = dict.fromkeys(samples, 0)
        for position, file in enumerate(files):
            study, series, instance = uids(file)
            path = f"/studies/{study}/series/{series}/instances/{instance}"
            found = lookup.post("/tools/lookup", content=instance).json()
            orthanc_id = next(r["ID"] for r in found if r["Type"] == "Instance")
            frames = range(1, US_FRAMES + 1) if group == "US multi-frame" else [None]
            for frame in frames:
                rendered = f"{path}/frames/{frame}/rendered" if frame else f"{path}/rendered"
                preview = (
                    f"/instances/{orthanc_id}/frames/{frame - 1}/preview"
                    if frame
                    else f"/instances/{orthanc_id}/preview"
                )
                asks = [
                    ("pocketpacs_cold", pocketpacs, f"/dicomweb{rendered}"),
                    ("pocketpacs_cached", pocketpacs, f"/dicomweb{rendered}"),
                    ("orthanc_rendered", orthanc, f"/dicom-web{rendered}"),
                    ("orthanc_rendered", orthanc, f"/dicom-web{rendered}"),
                    ("orthanc_preview", orthanc, preview),
                ]
                if position % 2:  # Orthanc first every other instance; cold stays first
                    asks = [asks[2], asks[3], asks[4], asks[0], asks[1]]
                for key, client, url in asks:
                    elapsed, status = timed(client, url)
                    if status == 200:
                        samples[key].append(elapsed)
                    else:
                        failures[key] += 1
        results[group] = {
            "instances": len(files),
            "failures": failures,
            **{key: summary(values) for key, values in samples.items()},
        }
        log(f"  {group:15s} " + " | ".join(f"{k} {v}" for k, v in results[group].items()))
    return results


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    # Two decimals: at about 1 ms, tenths would move a ratio by a tenth and decide a target.
    median = statistics.median(values)
    return {"n": len(values), "median": round(median, 2), "p95": round(p95, 2)}


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) per PS of the issue; None when it cannot be judged."""
    out = []

    def median(group: str, key: str) -> float | None:
        return results.get(group, {}).get(key, {}).get("median")

    for group in ("CT", "MR", "CR 2500x2048"):
        ours, theirs = median(group, "pocketpacs_cold"), median(group, "orthanc_rendered")
        met = None if ours is None or theirs is None else ours <= theirs
        out.append((f"{group}: cold at or below Orthanc /rendered", f"{ours} <= {theirs} ms", met))
    for group in GROUPS:
        ours, theirs = median(group, "pocketpacs_cached"), median(group, "orthanc_rendered")
        if theirs is None:
            continue
        out.append(
            (
                f"{group}: cached a third of Orthanc /rendered or less",
                f"{ours} <= {theirs / 3:.1f} ms",
                ours is not None and ours <= theirs / 3,
            )
        )
    j2k = results.get("CT JPEG 2000", {})
    rendered = j2k.get("pocketpacs_cold", {}).get("n", 0)
    out.append(
        (
            "JPEG 2000 rendered",
            f"{rendered} rendered, {j2k.get('failures', {}).get('pocketpacs_cold', 0)} failed"
            f" (Orthanc: {j2k.get('failures', {}).get('orthanc_rendered', 0)} failed)",
            rendered > 0 and not j2k.get("failures", {}).get("pocketpacs_cold"),
        )
    )
    return out


def report(data: dict) -> str:
    env = data["environment"]
    lines = [
        "# Rendering benchmark: pocketpacs vs Orthanc",
        "",
        f"Generated by `bench/render.py` on {env['date']}; method: `bench/README.md`"
        ' ("Rendering latency"). Milliseconds, client side, JPEG.',
        "",
        f"- {env['nproc']} CPUs ({env['cpu']}), kernel `{env['kernel']}`; shared machine",
        f"- pocketpacs commit `{env.get('pocketpacs_commit', '')}`;"
        f" Orthanc `{env.get('orthanc', '')}` with its DICOMweb plugin",
        "",
        "## Targets",
        "",
        "| target | figure | result |",
        "|---|---|---|",
    ]
    for target, figure, met in targets(data["results"]):
        verdict = "n/a" if met is None else "**PASS**" if met else "**FAIL**"
        lines.append(f"| {target} | {figure} | {verdict} |")
    lines += [
        "",
        "## Median / p95 by group",
        "",
        "| group | n | pocketpacs cold | pocketpacs cached | Orthanc /rendered | Orthanc "
        "/preview | cold / Orthanc | failures (pp cold, Orthanc rendered, preview) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group, row in data["results"].items():

        def cell(key: str, row=row) -> str:
            s = row[key]
            return f"{s['median']} / {s['p95']}" if s.get("n") else "failed"

        ours, theirs = row["pocketpacs_cold"], row["orthanc_rendered"]
        ratio = (
            f"{ours['median'] / theirs['median']:.2f}" if ours.get("n") and theirs.get("n") else ""
        )
        failures = row["failures"]
        lines.append(
            f"| {group} | {row['pocketpacs_cold'].get('n', 0)} | {cell('pocketpacs_cold')} | "
            f"{cell('pocketpacs_cached')} | {cell('orthanc_rendered')} | "
            f"{cell('orthanc_preview')} | {ratio} | {failures['pocketpacs_cold']}, "
            f"{failures['orthanc_rendered']}, {failures['orthanc_preview']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-group", type=int, default=20)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS-render.md")
    args = parser.parse_args(argv)
    corpus = Corpus(WORK / "corpus")
    chosen = choose(corpus.ensure(False, log=log), args.per_group)
    files = [f for group in chosen.values() for f in group]
    run_dir = WORK / "runs" / "render"
    log_dir = WORK / "logs" / f"render-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shim = build_shim(WORK)
    pocketpacs = Pocketpacs("pocketpacs", run_dir / "pocketpacs", log_dir / "pocketpacs.log")
    orthanc = start_orthanc(run_dir, log_dir, shim)
    data: dict = {"environment": environment(), "per_group": args.per_group}
    data["environment"]["orthanc"] = "1.10 (Debian)"
    try:
        pocketpacs.start()
        for server in (pocketpacs, orthanc):
            server.wait_ready()
        for server in (pocketpacs, orthanc):
            sent = storescu(files, corpus.root, server, 2, log_dir, f"load-{server.name}")
            if any(sent["codes"]):
                raise BenchError(f"storescu into {server.name}: {sent['codes']}")
        pocketpacs.wait_durable()
        time.sleep(5)  # let the thumbnail worker finish with the new series
        log(f"  {len(files)} instances in both; rendering ...")
        ours, theirs = KeepAlive(pocketpacs.http_port), KeepAlive(orthanc.http_port)
        try:
            orthanc_url = f"http://127.0.0.1:{orthanc.http_port}"
            with httpx.Client(base_url=orthanc_url, timeout=120) as lookup:
                data["results"] = measure(ours, theirs, lookup, chosen)
        finally:
            ours.close()
            theirs.close()
    finally:
        for server in (pocketpacs, orthanc):
            server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    write_results("render", data, args.results, report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
