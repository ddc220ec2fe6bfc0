"""The two servers under test, started fresh on free loopback ports, and what is measured
on their processes: resident memory of the process tree, CPU time, listening sockets."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from storage.spool import SPARE_FILES

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
ORTHANC = "/usr/sbin/Orthanc"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = 4


class BenchError(RuntimeError):
    """Something the benchmark cannot go on without."""


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before any fork
except OSError:
    _LIBC = None


def die_with_parent() -> None:
    """In a child: SIGTERM when the benchmark process dies, even by SIGKILL."""
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:
            return exc.code, {"raw": body[:200].decode(errors="replace")}


# process tree --------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                found.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """The process and all its descendants alive right now."""
    result, todo = [], [pid]
    while todo:
        current = todo.pop()
        result.append(current)
        todo.extend(children(current))
    return result


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system time of the process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class RssSampler:
    """Every `interval` s: RSS of the root process and of its whole tree; keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak_root_kb = 0
        self.peak_tree_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        pids = tree(self.root)
        values = {pid: rss_kb(pid) for pid in pids}
        self.peak_root_kb = max(self.peak_root_kb, values.get(self.root, 0))
        self.peak_tree_kb = max(self.peak_tree_kb, sum(values.values()))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in tree(root))


def listening_addresses(root: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the process tree listens on."""
    inode_owner: dict[str, int] = {}
    for pid in tree(root):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inode_owner[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inode_owner:
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            if v6:
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                address = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            else:
                address = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append((comm(inode_owner[inode]), address, int(port_hex, 16)))
    return found


def assert_loopback_only(name: str, root: int) -> list[tuple[str, str, int]]:
    found = listening_addresses(root)
    exposed = [
        f for f in found if f[1] not in ("127.0.0.1", "::1") and not f[1].startswith("::ffff:127.")
    ]
    if exposed:
        raise BenchError(f"{name} listens beyond loopback: {exposed}")
    return found


# servers --------------------------------------------------------------------------------


@dataclass
class Server:
    """Common start/stop of one server process (own process group, log file)."""

    name: str
    workdir: Path
    log_path: Path
    dicom_port: int = 0
    http_port: int = 0
    ae_title: str = ""
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_seconds: float = 0.0
    extra_pids: list[int] = field(default_factory=list)
    listening: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _spawn(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            tail = (
                self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            )
            raise BenchError(f"{self.name} exited during start-up:\n{tail}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if self.is_ready():
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} not ready within {timeout:.0f} s (log {self.log_path})"
                )
            time.sleep(0.2)
        self.ready_seconds = time.monotonic() - self.started_at
        # Everything below the server's own process that listens must be on loopback.
        self.extra_pids = [p for p in tree(self.pid) if p != self.pid]
        self.listening = assert_loopback_only(self.name, self.pid)

    health_url = ""  # an HTTP URL that answers 200 once the server is up

    def is_ready(self) -> bool:
        """HTTP answers 200 at `health_url` and the DICOM port accepts connections."""
        try:
            status, _ = http_get_json(self.health_url.format(port=self.http_port))
        except (OSError, ValueError):
            return False
        if status != 200:
            return False
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, wait, then SIGKILL the process group; children we saw are made sure of."""
        if self.process is None:
            return
        pids = set(tree(self.pid)) | set(self.extra_pids)
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        for pid in pids - {self.process.pid}:
            # Only processes this server started (its `weed`), by PID.
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process = None

    def instance_count(self) -> int:
        raise NotImplementedError


class Pocketpacs(Server):
    health_url = "http://127.0.0.1:{port}/healthz"

    def start(self, env_extra: dict[str, str] | None = None) -> None:
        """`env_extra` adds variables (POCKETPACS_DATABASE_URL for PostgreSQL, say) to an
        environment otherwise free of POCKETPACS_*."""
        self.dicom_port, self.http_port = free_port(), free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.ae_title = "POCKETPACS"
        env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETPACS_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(env_extra or {})
        self.data_dir = self.workdir / "data"
        command = [
            str(VENV_PYTHON),
            "-m",
            "pocketpacs",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--dicom-port",
            str(self.dicom_port),
            "--http-port",
            str(self.http_port),
            "--host",
            "127.0.0.1",
            # Any calling AE title, as Orthanc's default configuration accepts any sender.
            "--open",
        ]
        self._spawn(command, env, REPO)

    def healthz(self) -> tuple[int, dict]:
        return http_get_json(f"http://127.0.0.1:{self.http_port}/healthz")

    def is_ready(self) -> bool:
        """Ready, and done with first-start preparation: the spool's spare files exist (an
        archive that has run for a while has them; see storage.spool.SpoolFiles)."""
        if not super().is_ready():
            return False
        try:
            _, body = self.healthz()
        except (OSError, ValueError):
            return False
        return body.get("ingest_spool", {}).get("free_files", 0) >= SPARE_FILES

    def wait_durable(self, timeout: float = 1800.0, interval: float = 0.1) -> tuple[float, dict]:
        """Poll /healthz until ingest_spool.pending == 0; returns the moment and last body."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while True:
            try:
                status, last = self.healthz()
            except (OSError, ValueError) as exc:
                status, last = 0, {"error": str(exc)}
            spool = last.get("ingest_spool", {})
            if spool.get("pending") == 0:
                return time.monotonic(), last
            if time.monotonic() > deadline:
                raise BenchError(
                    f"pocketpacs spool not drained in {timeout:.0f} s: {status} {last}"
                )
            time.sleep(interval)

    def metrics(self) -> dict:
        """From /metrics: C-STORE outcomes, failure statuses, mean time to answer a data set."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/metrics", timeout=10
            ) as r:
                text = r.read().decode()
        except OSError as exc:
            return {"error": str(exc)}
        found: dict = {"outcomes": {}, "failures": {}}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            if name.startswith("pocketpacs_instances_received_total{") and 'route="cstore"' in name:
                outcome = name.split('outcome="', 1)[1].split('"', 1)[0]
                found["outcomes"][outcome] = int(float(value))
            elif name.startswith("pocketpacs_store_failures_total{"):
                status = name.split('status="', 1)[1].split('"', 1)[0]
                found["failures"][status] = int(float(value))
            elif name == 'pocketpacs_store_seconds_sum{route="cstore"}':
                found["answer_seconds_sum"] = float(value)
            elif name == 'pocketpacs_store_seconds_count{route="cstore"}':
                found["answer_count"] = int(float(value))
        if found.get("answer_count"):
            found["answer_ms_mean"] = round(
                found["answer_seconds_sum"] * 1000 / found["answer_count"], 2
            )
        return found

    def index_stats(self) -> tuple[int, int]:
        path = self.data_dir / "index.sqlite3"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM instances"
            ).fetchone()
        return int(count), int(size)

    def instance_count(self) -> int:
        return self.index_stats()[0]

    def stored_syntaxes(self) -> dict[str, int]:
        path = self.data_dir / "index.sqlite3"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            rows = db.execute(
                "SELECT transfer_syntax_uid, count(*) FROM instances GROUP BY 1"
            ).fetchall()
        return {str(uid): int(n) for uid, n in rows}

    def spool_leftovers(self) -> dict[str, int]:
        spool = self.data_dir / "spool"
        return {
            folder: sum(1 for p in (spool / folder).iterdir() if p.suffix == ".dcm")
            for folder in ("ready", "rejected")
            if (spool / folder).exists()
        }

    def log_problems(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]


class Orthanc(Server):
    health_url = "http://127.0.0.1:{port}/system"

    def start(
        self, shim: Path, plugins: list[str] | None = None, extra: dict | None = None
    ) -> None:
        """`plugins` (shared libraries) and `extra` configuration keys are for the query
        benchmark (DICOMweb, C-FIND permission); without them, no plugin and defaults."""
        self.dicom_port, self.http_port = free_port(), free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.ae_title = "ORTHANC"
        storage = self.workdir / "orthanc-storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pocketpacs-bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": list(plugins or []),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "SaveJobs": False,
            **(extra or {}),
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"
        env["LD_PRELOAD"] = str(shim)
        self._spawn([ORTHANC, str(config_path)], env, self.workdir)

    def statistics(self) -> dict:
        status, body = http_get_json(f"http://127.0.0.1:{self.http_port}/statistics", timeout=60)
        if status != 200:
            raise BenchError(f"Orthanc /statistics answered {status}: {body}")
        return body

    def instance_count(self) -> int:
        return int(self.statistics()["CountInstances"])

    def stored_syntaxes(self) -> dict[str, int]:
        """Transfer syntax of every stored instance (one metadata request each)."""
        base = f"http://127.0.0.1:{self.http_port}"
        status, ids = http_get_json(f"{base}/instances", timeout=60)
        found: dict[str, int] = {}
        for identifier in ids if status == 200 else []:
            url = f"{base}/instances/{identifier}/metadata/TransferSyntax"
            with urllib.request.urlopen(url, timeout=30) as response:
                uid = response.read().decode().strip()
            found[uid] = found.get(uid, 0) + 1
        return found

    def log_problems(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        # Orthanc logs its start-up at warning level: only errors count.
        return [ln for ln in lines if ln.startswith("E")]


def build_shim(workdir: Path) -> Path:
    """Compile bench/bindshim.c into workdir (once per source change)."""
    source = BENCH / "bindshim.c"
    target = workdir / "bindshim.so"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        workdir.mkdir(parents=True, exist_ok=True)
        gcc = shutil.which("gcc") or shutil.which("cc")
        if not gcc:
            raise BenchError("gcc is needed to build the bind shim for Orthanc")
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", str(target), str(source), "-ldl"], check=True
        )
    return target
