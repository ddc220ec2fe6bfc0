"""The `pocketpacs` command: a thin argparse shell over importable functions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from pocketpacs.archive import DEFAULT_INSTITUTION, Core, open_core, serve
from pocketpacs.settings import Settings, SettingsError, load_settings
from storage.check import check
from storage.embedded_s3 import EmbeddedS3Error
from storage.index import IndexUnavailable, Origin
from storage.ingest import InstanceToStore, StoreOutcome, StoreResult
from storage.objects import ObjectStoreUnavailable
from storage.spool import SpoolBusy

log = logging.getLogger("pocketpacs")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; our handlers log one line per association.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    flags = {
        "data_dir": args.data_dir,
        "dicom_port": getattr(args, "dicom_port", None),
        "ae_title": getattr(args, "ae_title", None),
        "http_port": getattr(args, "http_port", None),
        "host": getattr(args, "host", None),
        "open": getattr(args, "open", None) or None,
    }
    return load_settings(flags, args.config)


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    """Every regular file under the given files and folders, in a stable order."""
    for path in paths:
        if path.is_dir():
            for folder, _dirs, names in sorted(os.walk(path)):
                for name in sorted(names):
                    yield Path(folder) / name
        else:
            yield path


def import_files(
    core: Core, paths: Sequence[Path], institution: str, batch: int = 32, progress: bool = True
) -> tuple[Counter[StoreOutcome], list[tuple[Path, StoreResult]]]:
    """Load files through the ingest pipeline in batches; return counts and the failures."""
    files = list(_files(paths))
    counts: Counter[StoreOutcome] = Counter()
    failed: list[tuple[Path, StoreResult]] = []

    origin = Origin(institution=institution, route="import")
    with tqdm(total=len(files), unit="file", disable=not progress or len(files) < 2) as bar:
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            items = [InstanceToStore(path=path, origin=origin) for path in chunk]
            for path, result in zip(chunk, core.pipeline.store_many(items), strict=True):
                counts[result.outcome] += 1
                if not result.outcome.ok:
                    failed.append((path, result))
            bar.update(len(chunk))
    return counts, failed


def cmd_serve(args: argparse.Namespace) -> int:
    serve(_settings(args))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"pocketpacs import: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = _settings(args)
    with open_core(settings) as core:
        counts, failed = import_files(core, args.paths, args.institution, progress=not args.quiet)
    for path, result in failed:
        print(f"rejected {path}: {result.reason} (0x{result.outcome.dimse_status:04X})")
    rejected = sum(n for outcome, n in counts.items() if not outcome.ok)
    print(
        f"{counts[StoreOutcome.STORED]} stored, {counts[StoreOutcome.DUPLICATE]} duplicate, "
        f"{rejected} rejected"
    )
    return 1 if rejected else 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with open_core(settings) as core, tqdm(unit="object", disable=args.quiet) as bar:
        report = check(core.objects, core.index, repair=not args.no_repair, progress=bar.update)
    for key in report.reindexed:
        print(f"re-indexed {key}")
    for row in report.missing_objects:
        print(f"missing object {row.object_key} (SOP Instance {row.sop_instance_uid})")
    for row, size in report.size_mismatches:
        print(f"size differs {row.object_key}: index {row.size}, bucket {size}")
    for key, reason in report.unusable_objects:
        print(f"cannot index {key}: {reason}")
    print(
        f"{report.objects} objects, {report.rows} index rows, {len(report.reindexed)} re-indexed, "
        f"{len(report.missing_objects)} missing, {len(report.size_mismatches)} size mismatches, "
        f"{len(report.unusable_objects)} unusable"
    )
    return 0 if report.consistent else 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration file")
    common.add_argument("--data-dir", type=Path, help="data directory (default ./pocketpacs-data)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(prog="pocketpacs", description="Medical imaging cloud archive")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", parents=[common], help="run the DICOM and HTTP servers")
    p.add_argument("--dicom-port", type=int, help="DICOM port (default 11112)")
    p.add_argument("--ae-title", help="AE title (default POCKETPACS)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--open", action="store_true", help="development only: accept any caller (loopback only)"
    )
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("import", parents=[common], help="bulk load DICOM files or folders")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument(
        "--institution", default=DEFAULT_INSTITUTION, help="institution the files come from"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)

    p = commands.add_parser("check", parents=[common], help="reconcile the index and the bucket")
    p.add_argument("--no-repair", action="store_true", help="report only; re-index nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    parsed = build_parser().parse_args(args)
    _configure_logging(parsed.verbose)
    try:
        return parsed.func(parsed)
    except (
        SettingsError,
        SpoolBusy,
        EmbeddedS3Error,
        ObjectStoreUnavailable,
        IndexUnavailable,
        OSError,
    ) as exc:
        print(f"pocketpacs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
