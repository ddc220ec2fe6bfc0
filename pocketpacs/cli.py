"""The `pocketpacs` command: a thin argparse shell over importable functions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from pocketpacs.archive import Core, open_core, open_index, serve
from pocketpacs.logs import configure_logging
from pocketpacs.settings import Settings, SettingsError, load_settings
from storage import audit
from storage.audit import AuditEntry, AuditLog
from storage.check import check
from storage.embedded_s3 import EmbeddedS3Error
from storage.index import Index, IndexUnavailable, Origin
from storage.ingest import InstanceToStore, StoreOutcome, StoreResult
from storage.objects import ObjectStoreUnavailable
from storage.registry import DEFAULT_INSTITUTION, Registry, RegistryError, parse_scopes
from storage.shares import DEFAULT_DAYS, Shares, qr_code, study_institution
from storage.spool import SpoolBusy

log = logging.getLogger("pocketpacs")


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


def _audit_change(index: Index, action: str, resource: str, institution: str = "") -> None:
    AuditLog(index).record(
        AuditEntry(
            actor="cli", action=action, outcome=audit.OK, resource=resource, institution=institution
        )
    )


def cmd_institutions(args: argparse.Namespace) -> int:
    with open_index(_settings(args)) as index:
        registry = Registry(index)
        if args.action == "add":
            registry.add_institution(args.name, args.description)
            _audit_change(index, "institution.add", args.name, args.name)
            print(f"institution {args.name} added")
        else:
            for name, description in registry.institutions():
                print(f"{name}\t{description}")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    with open_index(_settings(args)) as index:
        registry = Registry(index)
        if args.action == "add":
            node = registry.add_node(args.ae_title, args.host, args.port, args.institution)
            _audit_change(index, "node.add", node.ae_title, node.institution)
            print(f"node {node.ae_title} at {node.host}:{node.port} ({node.institution}) added")
        elif args.action == "remove":
            if not registry.remove_node(args.ae_title):
                print(f"pocketpacs nodes: no node {args.ae_title!r}", file=sys.stderr)
                return 1
            _audit_change(index, "node.remove", args.ae_title)
            print(f"node {args.ae_title} removed")
        else:
            for node in registry.nodes():
                print(f"{node.ae_title}\t{node.host}:{node.port}\t{node.institution}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with open_index(_settings(args)) as index:
        registry = Registry(index)
        if args.action == "create":
            key = registry.create_key(args.institution, parse_scopes(args.scope), args.label)
            _audit_change(index, "key.create", key.key_id, key.institution)
            print(key.token)
            print(
                f"key {key.key_id} for {key.institution} ({','.join(key.scopes)}): "
                "shown once, store it now",
                file=sys.stderr,
            )
        elif args.action == "revoke":
            if not registry.revoke_key(args.key_id):
                print(f"pocketpacs keys: no live key {args.key_id!r}", file=sys.stderr)
                return 1
            _audit_change(index, "key.revoke", args.key_id)
            print(f"key {args.key_id} revoked")
        else:
            for key in registry.keys(args.institution):
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
                print(
                    f"{key.key_id}\t{key.institution}\t{','.join(key.scopes)}\t{state}\t{key.label}"
                )
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with open_index(settings) as index:
        institution = study_institution(index, args.study_uid)
        if institution is None:
            print(f"pocketpacs share: no study {args.study_uid}", file=sys.stderr)
            return 1
        made = Shares(index).create(
            args.study_uid,
            institution,
            "cli",
            expires_in_days=args.days,
            access_code=args.code,
            allow_download=args.download,
        )
        _audit_change(index, "share", args.study_uid, institution)
    url = f"{settings.base_url}/s/{made.token}"
    prefix = args.qr or Path(f"share-{made.link.id}")
    for kind in ("png", "svg"):
        prefix.with_suffix(f".{kind}").write_bytes(qr_code(url, kind))
    print(url)
    if made.access_code:
        print(f"access code: {made.access_code}")
    print(
        f"link {made.link.id} for {institution}, expires {made.link.expires_at:%Y-%m-%d %H:%M} UTC;"
        f" QR code in {prefix.with_suffix('.png')} and {prefix.with_suffix('.svg')}",
        file=sys.stderr,
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with open_index(_settings(args)) as index:
        entries = AuditLog(index).search(
            institution=args.institution,
            action=args.action,
            actor=args.actor,
            outcome=args.outcome,
            since=args.since,
            limit=args.limit,
        )
    for e in entries:
        print(
            f"{e.at:%Y-%m-%dT%H:%M:%S%z}\t{e.actor}\t{e.institution or '-'}\t{e.action}\t"
            f"{e.outcome}\t{e.resource or '-'}\t{e.source or '-'}\t{e.instances}\t{e.detail}"
        )
    return 0


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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

    p = commands.add_parser("institutions", help="hospitals on the platform")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", parents=[common], help="register an institution")
    a.add_argument("name")
    a.add_argument("--description", default="")
    actions.add_parser("list", parents=[common], help="list institutions")
    p.set_defaults(func=cmd_institutions)

    p = commands.add_parser("nodes", help="DICOM peers: calling AE titles, C-MOVE destinations")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", parents=[common], help="register a DICOM node")
    a.add_argument("ae_title", metavar="AE")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("--institution", required=True)
    a = actions.add_parser("remove", parents=[common], help="remove a DICOM node")
    a.add_argument("ae_title", metavar="AE")
    actions.add_parser("list", parents=[common], help="list DICOM nodes")
    p.set_defaults(func=cmd_nodes)

    p = commands.add_parser("keys", help="API keys of HTTP callers")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("create", parents=[common], help="create a key (shown once)")
    a.add_argument("--institution", required=True)
    a.add_argument("--scope", required=True, help="comma-separated: read,ingest,share,admin")
    a.add_argument("--label", default="", help="what the key is for")
    a = actions.add_parser("revoke", parents=[common], help="revoke a key at once")
    a.add_argument("key_id", metavar="KEY_ID")
    a = actions.add_parser("list", parents=[common], help="list keys (never their secrets)")
    a.add_argument("--institution")
    p.set_defaults(func=cmd_keys)

    p = commands.add_parser("share", parents=[common], help="make a pocket film link and QR code")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="days until it expires")
    p.add_argument("--code", action="store_true", help="demand a 6-digit access code")
    p.add_argument("--download", action="store_true", help="offer the original DICOM as a ZIP")
    p.add_argument("--qr", type=Path, help="QR code file name without extension")
    p.set_defaults(func=cmd_share)

    p = commands.add_parser("audit", parents=[common], help="read the audit trail, newest first")
    p.add_argument("--institution")
    p.add_argument("--action", help="e.g. store, associate, key.create")
    p.add_argument("--actor", help="calling AE title, key id or cli")
    p.add_argument("--outcome", choices=["ok", "partial", "failed", "refused"])
    p.add_argument("--since", type=_timestamp, help="ISO 8601 date or time")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_audit)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    parsed = build_parser().parse_args(args)
    configure_logging(logging.DEBUG if parsed.verbose else logging.INFO)
    try:
        return parsed.func(parsed)
    except (
        SettingsError,
        RegistryError,
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
