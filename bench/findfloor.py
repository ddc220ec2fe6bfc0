#!/usr/bin/env python
"""A bare pynetdicom C-FIND SCP that answers canned identifiers: the floor under any
pynetdicom-based SCP (pocketpacs' is one) on this machine, with no index behind it.

    python bench/findfloor.py PORT ANSWERS.json [--all-contexts]

ANSWERS.json maps a request (see `request_key`) to the number of matches to send. Every
answer carries each key the request asked for, filled with a value of its VR. One
Study Root FIND context, TCP_NODELAY on every connection, as pocketpacs does. With
`--all-contexts` it also supports what pocketpacs' AE supports (every storage SOP class
with every transfer syntax in both roles, the query/retrieve models, verification): the
same negotiation work at association set-up, nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    _STORAGE_CLASSES,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from servers import VENV_PYTHON, Server

AE_TITLE = "FINDFLOOR"
_SAMPLES = {
    "UI": "2.25.132264587454553906574457677313364605518",
    "DA": "20240611",
    "TM": "101500",
    "PN": "Bench^BENCHCT1",
    "IS": "1",
    "US": 512,
    "CS": "CT",
}


def request_key(identifier: Dataset) -> str:
    """Level and the non-empty matching values of a request, in one string."""
    parts = [
        f"{element.keyword}={element.value}"
        for element in identifier
        if element.keyword and element.value not in (None, "")
    ]
    return "|".join(sorted(parts))


def answer(identifier: Dataset, number: int) -> Dataset:
    ds = Dataset()
    for element in identifier:
        if not element.keyword:
            continue
        if element.value not in (None, ""):
            setattr(ds, element.keyword, element.value)
        elif element.keyword == "SOPInstanceUID":
            ds.SOPInstanceUID = f"{_SAMPLES['UI']}.{number}"
        else:
            vr = dictionary_VR(element.tag)
            setattr(ds, element.keyword, _SAMPLES.get(vr, "Bench value"))
    ds.RetrieveAETitle = AE_TITLE
    return ds


class _Listener(ThreadedAssociationServer):
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address


def _add_pocketpacs_contexts(ae: AE) -> None:
    """The supported contexts of pocketpacs' AE (pacs.server), rebuilt from pynetdicom."""
    native = ALL_TRANSFER_SYNTAXES[:4]
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for model in (
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(model, native)
    for sop_class in _STORAGE_CLASSES.values():
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)


def serve(port: int, answers: dict[str, int], all_contexts: bool = False) -> None:
    def handle_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        for number in range(answers.get(request_key(identifier), 0)):
            yield 0xFF00, answer(identifier, number)

    ae = AE(ae_title=AE_TITLE)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    if all_contexts:
        ae.maximum_associations = 64
        _add_pocketpacs_contexts(ae)
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_FIND, handle_find)], server_class=_Listener
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Event().wait()  # until SIGTERM


class FindFloor(Server):
    """This script as a benchmark server (DICOM only)."""

    def start(self, answers: dict[str, int], port: int, all_contexts: bool = False) -> None:
        self.dicom_port = port
        self.ae_title = AE_TITLE
        path = self.workdir / "answers.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(answers))
        command = [str(VENV_PYTHON), str(Path(__file__).resolve()), str(port), str(path)]
        if all_contexts:
            command.append("--all-contexts")
        self._spawn(command, dict(os.environ, PYTHONUNBUFFERED="1"), self.workdir)

    def is_ready(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", self.dicom_port)) == 0


if __name__ == "__main__":
    serve(int(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), "--all-contexts" in sys.argv)
