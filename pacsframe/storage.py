"""C-STORE both ways: the SCU that sends files, frames of files or datasets to a
peer, and the storage SCP that receives C-MOVE sub-operations for the cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from .deadline import Deadline, deadline_for, fired, timed_out
from .errors import AssociationError, NotSupported, PacsFrameError, QueryError
from .net.association import DEFAULT_MAX_PDU
from .net.operations import StoreWriterFactory
from .net.server import StorageServer

if TYPE_CHECKING:
    from .net import driver
    from .pacs import PACS

__all__ = ["StorageSCP", "StoreResult", "TransferResult", "storage_contexts", "store"]

LOGGER = logging.getLogger("pacsframe")

_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_LOSSLESS = [JPEGLosslessSV1, JPEG2000Lossless, JPEGLSLossless, RLELossless, JPEGLossless]
_LOSSY = [JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless]
# Retired, print and trial classes that no PACS sends: their context slots go to
# compressed twins of the commonest image classes (128 contexts at most, PS3.8).
_SKIPPED_CLASSES = {
    "1.2.840.10008.5.1.1.27",  # Stored Print
    "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image
    "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image
    "1.2.840.10008.5.1.4.1.1.10",  # Standalone Modality LUT
    "1.2.840.10008.5.1.4.1.1.11",  # Standalone VOI LUT
    "1.2.840.10008.5.1.4.1.1.129",  # Standalone PET Curve
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image - Trial
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image - Trial
    "1.2.840.10008.5.1.4.1.1.8",  # Standalone Overlay
    "1.2.840.10008.5.1.4.1.1.9",  # Standalone Curve
}
# The image classes a PACS most often holds compressed.
_COMPRESSED_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # MG for processing
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.3.1",  # US multi-frame
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
]
# How long our SCP waits for a peer's TLS handshake (a real one takes milliseconds).
_TLS_HANDSHAKE_SECONDS = 5.0
# A peer may accept at most 128 presentation contexts on one association (PS3.8).
_MAX_CONTEXTS = 128
_COLUMNS = (
    "path",
    "SOPInstanceUID",
    "SOPClassUID",
    "TransferSyntaxUID",
    "status",
    "code",
    "error",
)


@dataclass
class TransferResult:
    """Counts over an ``instances`` frame with a ``status`` column, one row per object."""

    instances: pd.DataFrame

    def _count(self, status: str) -> int:
        return int((self.instances["status"] == status).sum())

    @property
    def completed(self) -> int:
        """Objects transferred (status 0x0000)."""
        return self._count("completed")

    @property
    def warning(self) -> int:
        """Objects transferred with a warning status."""
        return self._count("warning")

    @property
    def failed(self) -> int:
        """Objects that were not transferred."""
        return self._count("failed")

    @property
    def failed_instances(self) -> pd.DataFrame:
        """The rows of ``instances`` that failed, with their error."""
        return self.instances[self.instances["status"] == "failed"]


@dataclass
class StoreResult(TransferResult):
    """What a :meth:`PACS.store` call did, one row per object in ``instances``.

    ``instances`` columns: path, SOPInstanceUID, SOPClassUID, TransferSyntaxUID,
    status (``"completed"``, ``"warning"`` or ``"failed"``), code (the DIMSE
    status, ``<NA>`` when nothing was sent) and error (a sentence, or ``<NA>``).
    """

    def __repr__(self) -> str:
        return (
            f"StoreResult(completed={self.completed}, warning={self.warning}, "
            f"failed={self.failed})"
        )


def storage_contexts(role: str = "requestor") -> list[PresentationContext]:
    """Storage contexts for C-GET sub-operations (``"requestor"``) or our SCP.

    As requestor (C-GET) the peer picks one transfer syntax per context, so each
    of 110 storage classes gets an uncompressed-only context (an uncompressed
    object is never recompressed, least of all lossily) and the 17 classes most
    often stored compressed get a second, compressed-only context, so such
    objects can arrive as stored: 127 contexts with the retrieve one.

    As acceptor (our storage SCP for C-MOVE) we choose: lossless compressed
    syntaxes first (an object offered in one arrives as stored), then
    uncompressed, lossy last (accepted only when nothing else is offered).
    """
    classes = [
        cx.abstract_syntax
        for cx in StoragePresentationContexts
        if cx.abstract_syntax not in _SKIPPED_CLASSES
    ]
    if role == "acceptor":
        syntaxes = [*_LOSSLESS, *_UNCOMPRESSED, *_LOSSY]
        return [build_context(uid, syntaxes) for uid in classes]
    contexts = [build_context(uid, _UNCOMPRESSED) for uid in classes]
    contexts += [build_context(uid, [*_LOSSLESS, *_LOSSY]) for uid in _COMPRESSED_CLASSES]
    return contexts


class StorageSCP:
    """Our own storage SCP, running for the duration of a C-MOVE.

    It listens as the PACS's ``calling_ae`` on ``pacs.scp_port``: the peer must
    know that AE title with our host and that port. It binds loopback when the
    peer is on this machine, every interface otherwise. It runs on pacsframe's
    own engine (:class:`pacsframe.net.server.StorageServer`): each object's data
    set streams, fragment by fragment, to the writer ``on_store`` gives for it.

    When the PACS has ``tls=TLS(cert=..., key=...)`` the SCP speaks only TLS,
    with that certificate; with ``tls.ca`` too it requires the peer's client
    certificate to be signed by that CA.

    Parameters
    ----------
    pacs : PACS
        Whose ``calling_ae``, ``scp_port``, ``tls``, ``max_pdu`` and timeouts apply.
    on_store : callable
        A :data:`~pacsframe.net.operations.StoreWriterFactory`, such as the
        C-MOVE receiver's ``writer``: called with each incoming object's
        :class:`~pacsframe.net.operations.StoreRequest`, from the
        association's thread.
    """

    def __init__(self, pacs: PACS, on_store: StoreWriterFactory) -> None:
        self.pacs = pacs
        self.on_store = on_store
        self.server: StorageServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where the SCP listens (host, port)."""
        loopback = self.pacs.host in ("localhost", "::1") or self.pacs.host.startswith("127.")
        return ("127.0.0.1" if loopback else "", self.pacs.scp_port)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS the SCP uses (None: plain DICOM)."""
        from .pacs import TLS

        tls = self.pacs.tls
        if not isinstance(tls, TLS) or tls.cert is None:
            return None
        return tls.server_context()

    def start(self) -> StorageSCP:
        """Listen and serve in background threads; returns ``self``.

        Raises :class:`~pacsframe.errors.AssociationError` when the port cannot
        be bound.
        """
        pacs = self.pacs
        host, port = self.address
        server = StorageServer(
            self.on_store,
            ae_title=pacs.calling_ae,
            storage=[
                (cx.abstract_syntax, cx.transfer_syntax) for cx in storage_contexts("acceptor")
            ],
            host=host,
            port=port,
            ssl_context=self.ssl_context,
            # 0 means no limit to pynetdicom; ours stays bounded, as does each fragment.
            max_pdu=pacs.max_pdu or DEFAULT_MAX_PDU,
            acse_timeout=pacs.acse_timeout,
            # The peer may pause between sub-operations as long as between messages.
            dimse_timeout=max(pacs.dimse_timeout, pacs.network_timeout),
            tls_timeout=_TLS_HANDSHAKE_SECONDS,
        )
        try:
            server.start()
        except OSError as exc:
            raise AssociationError(
                f"could not start our storage SCP on port {pacs.scp_port}: "
                f"{exc.strerror or exc}. Choose a free scp_port for the PACS.",
                reason="refused",
            ) from None
        self.server = server
        return self

    def stop(self) -> None:
        """Stop serving (associations still open are cut); safe to call twice."""
        if self.server is not None:
            self.server.stop()
            self.server = None


@dataclass
class _Item:
    path: str | None
    dataset: Dataset | None
    sop_instance: str
    sop_class: str
    syntax: str
    error: str | None = None


def _iter_sources(source: Any) -> Iterator[str | Dataset]:
    if isinstance(source, Dataset):
        yield source
    elif isinstance(source, pd.DataFrame):
        if "path" not in source.columns:
            raise QueryError(
                "a frame to store needs a 'path' column of DICOM files (such as "
                "cache.instances() or a make_cohort manifest)."
            )
        yield from (str(p) for p in source["path"].dropna())
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            yield from (str(p) for p in sorted(path.rglob("*")) if p.is_file())
        elif path.exists():
            yield str(path)
        else:
            raise QueryError(f"{path} does not exist; give a DICOM file or a folder of them.")
    elif isinstance(source, Iterable):
        for item in source:
            yield from _iter_sources(item)
    else:
        raise QueryError(
            f"cannot store a {type(source).__name__}; give paths, a folder, a frame with a "
            "'path' column, or pydicom Datasets."
        )


def _describe(source: str | Dataset) -> _Item:
    if isinstance(source, Dataset):
        meta = getattr(source, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
        sop_class = str(source.get("SOPClassUID", ""))
        sop_instance = str(source.get("SOPInstanceUID", ""))
        item = _Item(None, source, sop_instance, sop_class, syntax)
    else:
        try:
            meta = read_file_meta_info(source)
        except (InvalidDicomError, OSError, ValueError) as exc:
            return _Item(source, None, "", "", "", f"not a readable DICOM file ({exc})")
        item = _Item(
            source,
            None,
            str(meta.get("MediaStorageSOPInstanceUID", "")),
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("TransferSyntaxUID", "")),
        )
    if not item.sop_class or not item.sop_instance or not item.syntax:
        item.error = "it has no SOP Class UID, SOP Instance UID or transfer syntax"
    return item


def _contexts_for(items: list[_Item]) -> list[tuple[str, tuple[str]]]:
    # One context per (SOP class, transfer syntax) so each file goes as it is stored.
    pairs = dict.fromkeys((item.sop_class, item.syntax) for item in items)
    return [(sop_class, (syntax,)) for sop_class, syntax in pairs]


def _batches(items: list[_Item]) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    keys: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class, item.syntax)
        if key not in keys and len(keys) == _MAX_CONTEXTS:
            yield batch
            batch, keys = [], set()
        keys.add(key)
        batch.append(item)
    if batch:
        yield batch


def store(pacs: PACS, source: Any, *, timeout: float | None = None) -> StoreResult:
    """C-STORE every object in ``source`` to ``pacs``; never raises for one bad file.

    Parameters
    ----------
    pacs : PACS
        The peer.
    source : path, folder, list of paths, DataFrame with ``path``, Dataset(s)
        What to send. Folders are walked recursively.
    timeout : float, optional
        Seconds for the whole call. When they run out no further object is sent,
        the association is aborted if a C-STORE is in flight (DIMSE has no cancel
        for it), and an ``AssociationError`` with ``reason="timeout"`` carries
        the ``StoreResult`` as ``.result``. None (the default): no overall limit.

    Returns
    -------
    StoreResult
        Counts and one row per object with its status.

    Raises
    ------
    AssociationError
        The peer cannot be reached or refuses us, or ``timeout`` ran out.

    Examples
    --------
    >>> from pacsframe.demo import DemoPACS, make_cohort
    >>> import tempfile
    >>> cohort = make_cohort(tempfile.mkdtemp(), patients=1, seed=3)
    >>> from pacsframe import PACS
    >>> with DemoPACS(tempfile.mkdtemp()) as server:
    ...     result = PACS("127.0.0.1", server.port, server.ae_title).store(cohort)
    >>> result.completed == len(cohort)
    True
    """
    with deadline_for(timeout, "store") as deadline:
        return _store(pacs, source, deadline)


def _store(pacs: PACS, source: Any, deadline: Deadline | None) -> StoreResult:
    items = [_describe(s) for s in _iter_sources(source)]
    rows: list[dict[str, Any]] = []
    sendable = [i for i in items if i.error is None]
    for item in items:
        if item.error is not None:
            rows.append(_row(item, "failed", None, f"not sent: {item.error}"))
    stopped: BaseException | None = None
    try:
        _send(pacs, sendable, rows, deadline)
    except PacsFrameError as exc:
        if not fired(deadline):
            raise
        stopped = exc
    reached = {id(r["_item"]) for r in rows}
    unsent = [item for item in items if id(item) not in reached]
    for item in unsent:
        rows.append(_row(item, "failed", None, "not sent: the call's timeout= ran out first"))
    result = _store_result(pacs, items, rows)
    cut = stopped is not None or unsent or any(r.get("_cut") for r in rows)
    if fired(deadline) and cut:
        advice = (
            "This error's .result says which objects were stored; store the rest again, or "
            "raise timeout= (None: no overall limit)."
        )
        if stopped is not None:
            error = timed_out(deadline, stopped, "C-STORE", advice)
        else:
            error = deadline.error("C-STORE", advice)  # type: ignore[union-attr]
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result


def _send(
    pacs: PACS, sendable: list[_Item], rows: list[dict[str, Any]], deadline: Deadline | None
) -> None:
    """C-STORE ``sendable``, one association per batch of contexts; a row per item reached.

    The call's ``timeout=`` is the association's ``limit``: the driver aborts a
    C-STORE in flight when it passes (DIMSE cannot cancel one) and raises
    :class:`~pacsframe.net.driver.LimitReached`; no object is started after it.
    """
    for batch in _batches(sendable):
        contexts = _contexts_for(batch)
        # Held associations are keyed by purpose; a batch with other contexts needs its own.
        purpose = "store:" + ",".join(sorted(f"{sop_class}/{ts[0]}" for sop_class, ts in contexts))
        with contextlib.ExitStack() as stack:
            try:
                assoc = stack.enter_context(pacs.session(contexts, purpose))
            except NotSupported:
                # The peer accepted none of the batch's contexts: a row each, no exception.
                for item in batch:
                    rows.append(_row(item, "failed", None, _no_context(pacs, item)))
                continue
            accepted = set(assoc.contexts.values())
            for item in batch:
                if deadline is not None and deadline.expired:
                    deadline.fired = True
                    break
                if (item.sop_class, item.syntax) not in accepted:
                    rows.append(_row(item, "failed", None, _no_context(pacs, item)))
                    continue
                if not _send_one(assoc, item, rows, deadline):
                    break
        if fired(deadline):
            return  # _store accounts for what was not sent
        # Anything the loop did not reach (the association was lost) failed too.
        reached = {id(r["_item"]) for r in rows}
        for item in batch:
            if id(item) not in reached:
                rows.append(_row(item, "failed", None, "not sent: the association was lost"))


def _send_one(
    assoc: driver.ClientAssociation,
    item: _Item,
    rows: list[dict[str, Any]],
    deadline: Deadline | None,
) -> bool:
    """C-STORE one object and add its row; False when the association is gone."""
    if item.dataset is not None:
        try:
            source: bytes | str = _encode(item.dataset, item.syntax)
        except Exception as exc:  # pydicom raises many types for a data set it cannot write
            # pydicom's message goes on with a traceback and the element's value.
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rows.append(
                _row(item, "failed", None, f"not sent: pydicom could not encode it ({why})")
            )
            return True
    else:
        assert item.path is not None
        source = item.path
    try:
        rsp = assoc.store_response(source, item.sop_class, item.sop_instance, item.syntax)
    except AssociationError as exc:  # sending or waiting (before OSError: it is one)
        return _lost(item, exc, rows, deadline)
    except (OSError, ValueError) as exc:
        # Reading the file failed (it changed since we read its meta): nothing was sent.
        rows.append(_row(item, "failed", None, f"not sent: could not read it ({exc})"))
        return True
    code = rsp.status
    assert code is not None  # the driver checked the response has one
    category = code_to_category(code)
    if code == 0x0000:
        rows.append(_row(item, "completed", code, None))
    elif category == "Warning":
        rows.append(_row(item, "warning", code, _status_sentence(code, rsp.error_comment)))
    else:
        rows.append(_row(item, "failed", code, _status_sentence(code, rsp.error_comment)))
    return True


def _lost(
    item: _Item, exc: AssociationError, rows: list[dict[str, Any]], deadline: Deadline | None
) -> bool:
    """The row of an object whose C-STORE ended the association."""
    timed_out(deadline, exc, "C-STORE")  # marks the deadline fired when it was the limit
    if fired(deadline):
        lost = (
            "no response before the call's timeout= ran out (the association was aborted); "
            "the peer may or may not have stored it"
        )
    else:
        lost = f"no response (association lost: {exc})"
    rows.append({**_row(item, "failed", None, lost), "_cut": fired(deadline)})
    return False


def _encode(dataset: Dataset, syntax: str) -> bytes:
    """``dataset`` encoded once, in ``syntax`` (its own transfer syntax)."""
    uid = UID(syntax)
    implicit, little, deflated = False, True, False
    if uid.is_transfer_syntax:
        implicit, little, deflated = uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, dataset)
    data = buffer.getvalue()
    if deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
        data += b"\x00" * (len(data) % 2)
    return data


def _no_context(pacs: PACS, item: _Item) -> str:
    return (
        f"{pacs.ae_title} accepted no presentation context for this SOP class "
        f"({item.sop_class}) in transfer syntax {item.syntax}"
    )


def _store_result(pacs: PACS, items: list[_Item], rows: list[dict[str, Any]]) -> StoreResult:
    by_item = {id(r["_item"]): r for r in rows}
    ordered = [by_item[id(i)] for i in items]
    frame = pd.DataFrame(
        {
            "path": pd.array([r["path"] for r in ordered], dtype="string"),
            "SOPInstanceUID": pd.array([r["SOPInstanceUID"] for r in ordered], dtype="string"),
            "SOPClassUID": pd.array([r["SOPClassUID"] for r in ordered], dtype="string"),
            "TransferSyntaxUID": pd.array(
                [r["TransferSyntaxUID"] for r in ordered], dtype="string"
            ),
            "status": pd.array([r["status"] for r in ordered], dtype="string"),
            "code": pd.array([r["code"] for r in ordered], dtype="Int64"),
            "error": pd.array([r["error"] for r in ordered], dtype="string"),
        },
        columns=list(_COLUMNS),
    )
    result = StoreResult(frame)
    LOGGER.info(
        "%s to %s: %d completed, %d warning, %d failed",
        "STOW-RS" if hasattr(pacs, "transport") else "C-STORE",
        peer_name(pacs),
        result.completed,
        result.warning,
        result.failed,
    )
    return result


def peer_name(peer: Any) -> str:
    """How messages name a peer: a DIMSE peer's AE title, a DICOMweb service's URL.

    A URL loses any ``user:password@`` part: credentials never reach a message.
    """
    title = getattr(peer, "ae_title", None)
    if title:
        return str(title)
    url = str(getattr(peer, "base", None) or getattr(peer, "url", None) or "the peer")
    return re.sub(r"//[^/@]*@", "//", url)


def _status_sentence(code: int, comment: str | None) -> str:
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    sentence = f"0x{code:04X} {category}" + (f": {text}" if text else "")
    return sentence + (f" ({comment})" if comment else "")


def _row(item: _Item, status: str, code: int | None, error: str | None) -> dict[str, Any]:
    return {
        "_item": item,
        "path": item.path,
        "SOPInstanceUID": item.sop_instance or None,
        "SOPClassUID": item.sop_class or None,
        "TransferSyntaxUID": item.syntax or None,
        "status": status,
        "code": code,
        "error": error,
    }
