"""pacsframe's own DICOM upper layer (PS3.8) and DIMSE command sets (PS3.7).

Built like h11 and wsproto: the protocol is a state machine that takes bytes
and gives events (:mod:`~pacsframe.net.association`), over plain codecs for
PDUs (:mod:`~pacsframe.net.pdu`) and command sets (:mod:`~pacsframe.net.dimse`);
a thin blocking driver (:mod:`~pacsframe.net.driver`) runs it over a socket in
the calling thread. Only the storage SCP (:mod:`~pacsframe.net.server`) starts
threads: one to accept, one per association.

Every call of :class:`pacsframe.PACS` runs on it: C-ECHO, C-FIND, C-STORE,
C-GET (objects streamed to a caller's writer, :mod:`~pacsframe.net.operations`),
C-MOVE and C-CANCEL, and our storage SCP for C-MOVE (C-ECHO, C-STORE). DICOM TLS
settings and handshake diagnoses are in :mod:`~pacsframe.net.tls`.

Examples
--------
>>> import tempfile
>>> from pacsframe import net
>>> from pacsframe.demo import DemoPACS
>>> with tempfile.TemporaryDirectory() as folder, DemoPACS(folder) as server:
...     with net.associate("127.0.0.1", server.port, called_ae=server.ae_title) as assoc:
...         status = assoc.echo()
>>> hex(status)
'0x0'
"""

from pacsframe.errors import ProtocolError
from pacsframe.net import association, dimse, driver, operations, pdu, server
from pacsframe.net.association import Association, State
from pacsframe.net.dimse import Command, decode_command, encode_command
from pacsframe.net.driver import ClientAssociation, associate, echo
from pacsframe.net.server import StorageServer

__all__ = [
    "Association",
    "ClientAssociation",
    "Command",
    "ProtocolError",
    "State",
    "StorageServer",
    "associate",
    "association",
    "decode_command",
    "dimse",
    "driver",
    "echo",
    "encode_command",
    "operations",
    "pdu",
    "server",
]
