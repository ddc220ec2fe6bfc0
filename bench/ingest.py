#!/usr/bin/env python
"""C-STORE ingest benchmark: pocketpacs against Orthanc (Debian, 1.10) on the same corpus.

    .venv/bin/python bench/ingest.py            # full: ~2,290 instances / 1.09 GB, 3 repeats
    .venv/bin/python bench/ingest.py --quick    # 199-instance subset, 2 repeats (try the harness)
    .venv/bin/python bench/ingest.py --only-large   # only the 500 MB multi-frame instance

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import Corpus, CorpusFile, describe
from report import report
from servers import (
    BENCH,
    REPO,
    VENV_PYTHON,
    Orthanc,
    Pocketpacs,
    RssSampler,
    build_shim,
    cpu_seconds,
    die_with_parent,
    tree_cpu_seconds,
)

WORK = BENCH / "work"
STORESCU_CFG = BENCH / "storescu.cfg"
CALLING_AE = "BENCHSCU"
MB = 1e6  # throughput and sizes in decimal megabytes


def log(message: str) -> None:
    print(message, flush=True)


# sending ---------------------------------------------------------------------------------


def storescu(
    files: list[CorpusFile],
    root: Path,
    server,
    associations: int,
    log_dir: Path,
    tag: str,
    profile: str = "Bench",
) -> dict:
    """Send with `associations` storescu processes in parallel (files dealt round-robin);
    wall time from the first start to the last exit."""
    shares = [files[i::associations] for i in range(associations)]
    env = dict(os.environ, TCP_NODELAY="1")
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    started = time.monotonic()
    for number, share in enumerate(shares):
        log_path = log_dir / f"{tag}-storescu-{number}.log"
        command = [
            "storescu",
            "-aet",
            CALLING_AE,
            "-aec",
            server.ae_title,
            "-xf",
            str(STORESCU_CFG),
            profile,
            "127.0.0.1",
            str(server.dicom_port),
            *(str(f.path.relative_to(root)) for f in share),
        ]
        handle = log_path.open("wb")
        procs.append(
            (
                subprocess.Popen(
                    command,
                    cwd=root,
                    env=env,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                ),
                handle,
                log_path,
            )
        )
    codes = []
    try:
        for proc, handle, _ in procs:
            codes.append(proc.wait(timeout=3600))
            handle.close()
    finally:
        for proc, handle, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            handle.close()
    finished = time.monotonic()
    messages = []
    for _, _, log_path in procs:
        for line in log_path.read_text(errors="replace").splitlines():
            if line[:2] in ("E:", "W:", "F:"):
                messages.append(f"{log_path.name}: {line}")
    return {"started": started, "finished": finished, "codes": codes, "messages": messages}


def _names(counts: dict[str, int]) -> str:
    from pydicom.uid import UID

    return ", ".join(f"{UID(uid).name}: {n}" for uid, n in sorted(counts.items()))


# one run ---------------------------------------------------------------------------------


def loadavg() -> float:
    return os.getloadavg()[0]


def one_run(
    kind: str, files: list[CorpusFile], root: Path, associations: int, tag: str, args, shim: Path
) -> dict:
    run_dir = WORK / "runs" / tag
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log_dir = args.log_dir
    expected = len(files)
    total_bytes = sum(f.size for f in files)
    result: dict = {
        "server": kind,
        "associations": associations,
        "tag": tag,
        "instances": expected,
        "bytes": total_bytes,
        "load_before": round(loadavg(), 2),
    }
    if kind == "pocketpacs":
        server = Pocketpacs("pocketpacs", run_dir, log_dir / f"{tag}-server.log")
        server.start()
    else:
        server = Orthanc("orthanc", run_dir, log_dir / f"{tag}-server.log")
        server.start(shim)
    try:
        server.wait_ready()
        result["ready_s"] = round(server.ready_seconds, 2)
        result["listening"] = [f"{name} {addr}:{port}" for name, addr, port in server.listening]
        pid = server.pid
        cpu_root0, cpu_tree0 = cpu_seconds(pid), tree_cpu_seconds(pid)
        with RssSampler(pid) as rss:
            result["idle_rss_root_mb"] = round(rss.peak_root_kb / 1024, 1)
            result["idle_rss_tree_mb"] = round(rss.peak_tree_kb / 1024, 1)
            sent = storescu(files, root, server, associations, log_dir, tag, args.profile)
            send_s = sent["finished"] - sent["started"]
            if kind == "pocketpacs":
                durable_at, health = server.wait_durable()
                result["durable_s"] = round(durable_at - sent["started"], 3)
                result["durable_ips"] = round(expected / (durable_at - sent["started"]), 1)
                result["drain_after_send_s"] = round(durable_at - sent["finished"], 3)
                result["health_after"] = health
        cpu_root1, cpu_tree1 = cpu_seconds(pid), tree_cpu_seconds(pid)
        result.update(
            send_s=round(send_s, 3),
            send_ips=round(expected / send_s, 1),
            send_mbps=round(total_bytes / MB / send_s, 1),
            peak_rss_root_mb=round(rss.peak_root_kb / 1024, 1),
            peak_rss_tree_mb=round(rss.peak_tree_kb / 1024, 1),
            rss_samples=rss.samples,
            cpu_root_s=round(cpu_root1 - cpu_root0, 2),
            cpu_tree_s=round(cpu_tree1 - cpu_tree0, 2),
            cpu_ms_per_instance=round((cpu_tree1 - cpu_tree0) * 1000 / expected, 2),
            storescu_codes=sent["codes"],
            storescu_messages=sent["messages"][:20],
        )
        count = server.instance_count()
        result["stored_count"] = count
        if kind == "pocketpacs":
            result["stored_bytes"] = server.index_stats()[1]
            result["spool_leftovers"] = server.spool_leftovers()
            result["metrics"] = server.metrics()
        else:
            stats = server.statistics()
            result["stored_bytes"] = int(stats.get("TotalDiskSize", 0))
        result["server_log_problems"] = server.log_problems()[:20]
        sent_syntaxes: dict[str, int] = {}
        for f in files:
            sent_syntaxes[f.syntax] = sent_syntaxes.get(f.syntax, 0) + 1
        stored_syntaxes = server.stored_syntaxes()
        result["stored_syntaxes"] = stored_syntaxes
        if stored_syntaxes != sent_syntaxes:
            result["warning"] = (
                f"stored transfer syntaxes {_names(stored_syntaxes)} differ from the files' "
                f"{_names(sent_syntaxes)} (storescu converted them for this server)"
            )
        errors = []
        if any(code != 0 for code in sent["codes"]):
            errors.append(f"storescu exit codes {sent['codes']}")
        if sent["messages"]:
            errors.append(f"storescu reported: {sent['messages'][:3]}")
        if count != expected:
            errors.append(f"server holds {count} instances, {expected} sent")
        if kind == "pocketpacs" and result["metrics"].get("failures"):
            errors.append(f"failure statuses {result['metrics']['failures']}")
        if kind == "pocketpacs" and any(result["spool_leftovers"].values()):
            errors.append(f"spool leftovers {result['spool_leftovers']}")
        if errors:
            result["error"] = "; ".join(errors)
    except Exception as exc:  # record, stop the server, go on with the next run
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        server.stop()
        result["load_after"] = round(loadavg(), 2)
        if not args.keep_data:
            shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()
    return result


def summary_line(r: dict) -> str:
    parts = [
        f"{r['server']:>10} x{r['associations']}",
        f"send {r.get('send_ips', '-')} inst/s {r.get('send_mbps', '-')} MB/s "
        f"({r.get('send_s', '-')} s)",
    ]
    if "durable_ips" in r:
        parts.append(f"durable {r['durable_ips']} inst/s ({r['durable_s']} s)")
    if r.get("metrics", {}).get("answer_ms_mean") is not None:
        parts.append(f"answer {r['metrics']['answer_ms_mean']} ms")
    parts.append(
        f"peak RSS {r.get('peak_rss_root_mb', '-')} MB (tree {r.get('peak_rss_tree_mb', '-')})"
    )
    parts.append(f"CPU {r.get('cpu_ms_per_instance', '-')} ms/inst")
    parts.append(f"stored {r.get('stored_count', '-')}/{r['instances']}")
    parts.append(f"load {r['load_before']}")
    if r.get("error"):
        parts.append(f"ERROR: {r['error']}")
    if r.get("warning"):
        parts.append(f"WARNING: {r['warning']}")
    return " | ".join(parts)


# environment -----------------------------------------------------------------------------


def capture(command: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def write_results(name: str, data: dict, results: Path, report: str) -> Path:
    """Keep a run's raw data under work/results/ and write its report; the data's path."""
    out = WORK / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    results.write_text(report)
    print(f"wrote {results} and {out}", flush=True)
    return out


def environment() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    commit = capture(["git", "rev-parse", "HEAD"], REPO)
    dirty = capture(
        [
            "git",
            "status",
            "--porcelain",
            "--",
            "pocketpacs",
            "pacs",
            "storage",
            "viewer_api",
            "pyproject.toml",
        ],
        REPO,
    )
    weed = Path(VENV_PYTHON).with_name("weed")
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "orthanc": capture(["/usr/sbin/Orthanc", "--version"]).splitlines()[0],
        "dcmtk": capture(["storescu", "--version"]).splitlines()[0],
        "pocketpacs_commit": commit + (" (working tree has uncommitted changes)" if dirty else ""),
        "python_packages": capture(
            [
                str(VENV_PYTHON),
                "-c",
                "import pydicom, pynetdicom, sys; print(f'Python {sys.version.split()[0]}, "
                "pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}')",
            ]
        ),
        "seaweedfs": capture([str(weed), "version"]).splitlines()[0]
        if weed.exists()
        else "not found",
    }


# main ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="199-instance subset (about 130 MB)")
    parser.add_argument(
        "--repeats", type=int, help="runs per server and configuration (default 3, quick 2)"
    )
    parser.add_argument(
        "--associations", default="1,4", help="comma-separated association counts (default 1,4)"
    )
    parser.add_argument(
        "--no-large", action="store_true", help="skip the 500 MB multi-frame instance"
    )
    parser.add_argument(
        "--only-large", action="store_true", help="only the 500 MB multi-frame instance"
    )
    parser.add_argument(
        "--large-frames",
        type=int,
        default=1000,
        help="frames of 512x512 16-bit (default 1000: 524 MB)",
    )
    parser.add_argument(
        "--servers", default="pocketpacs,orthanc", help="which servers, in alternation order"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="markdown report (default bench/RESULTS.md; quick/only-large: bench/work/)",
    )
    parser.add_argument(
        "--explicit-only",
        action="store_true",
        help="offer only Explicit VR LE for uncompressed files (storescu converts nothing)",
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep each run's server data under bench/work/runs"
    )
    parser.add_argument(
        "--report-from", type=Path, help="rewrite the markdown report from a saved JSON and exit"
    )
    args = parser.parse_args(argv)
    args.profile = "BenchExplicitOnly" if args.explicit_only else "Bench"
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.no_large and args.only_large:
        parser.error("--no-large and --only-large exclude each other")
    if args.results is None:
        if args.only_large:
            args.results = WORK / "RESULTS-large.md"
        elif args.quick:
            args.results = WORK / "RESULTS-quick.md"
        else:
            args.results = BENCH / "RESULTS.md"
    return args


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        data = json.loads(args.report_from.read_text())
        args.results.write_text(report(data))
        log(f"wrote {args.results}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.log_dir = WORK / "logs" / stamp
    args.log_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("storescu", "/usr/sbin/Orthanc"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    shim = build_shim(WORK)
    corpus = Corpus(WORK / "corpus")
    data: dict = {
        "quick": args.quick,
        "environment": environment(),
        "corpus": [],
        "runs": [],
        "large": [],
    }
    log(
        f"pocketpacs ingest benchmark ({'quick' if args.quick else 'full'}), logs in {args.log_dir}"
    )
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    json_path = WORK / "results" / f"{stamp}{'-quick' if args.quick else ''}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        data["wall_s"] = round(time.monotonic() - began, 1)
        json_path.write_text(json.dumps(data, indent=1))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report(data))

    try:
        if not args.only_large:
            log("corpus ...")
            files = corpus.ensure(args.quick, log=log)
            data["corpus"] = describe(files)
            total = sum(f.size for f in files)
            log(f"  {len(files)} instances, {total / MB:.0f} MB; reading once into the page cache")
            for f in files:
                with f.path.open("rb") as handle:
                    while handle.read(1 << 20):
                        pass
            counts = [int(a) for a in args.associations.split(",")]
            for repeat in range(args.repeats):
                for associations in counts:
                    for kind in servers:
                        tag = f"r{repeat + 1}-a{associations}-{kind}"
                        result = one_run(kind, files, corpus.root, associations, tag, args, shim)
                        data["runs"].append(result)
                        log("  " + summary_line(result))
                        save()
        if not args.no_large:
            log("large instance ...")
            big = corpus.ensure_large(args.large_frames, log=log)
            log(f"  {big.size / MB:.0f} MB, {args.large_frames} frames")
            with big.path.open("rb") as handle:
                while handle.read(1 << 22):
                    pass
            for kind in servers:
                result = one_run(kind, [big], corpus.root, 1, f"large-{kind}", args, shim)
                data["large"].append(result)
                log("  " + summary_line(result))
                save()
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        save()
        return 130
    save()
    log(f"wrote {args.results} and {json_path} ({(time.monotonic() - began) / 60:.1f} min)")
    failed = [r for r in data["runs"] + data["large"] if r.get("error")]
    for r in failed:
        log(f"FAILED {r['tag']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
