"""pacsframe: query a PACS into typed pandas DataFrames, retrieve into a safe cache.

Examples
--------
>>> import pacsframe as pf
>>> pacs = pf.PACS("127.0.0.1", 4242, ae_title="ORTHANC")
>>> pacs
PACS('127.0.0.1', 4242, ae_title='ORTHANC', calling_ae='PACSFRAME')
>>> issubclass(pf.QueryError, ValueError), issubclass(pf.AssociationError, ConnectionError)
(True, True)
"""

from .cache import Cache, Volume
from .deidentify import ExportResult
from .dicomweb import DICOMweb
from .errors import (
    AssociationError,
    CacheError,
    CountMismatchWarning,
    DimseError,
    HTTPError,
    MoveDestinationUnknown,
    NotSupported,
    PacsFrameError,
    QueryError,
    ResultsCapped,
    UnreadableFileWarning,
    UnusableListingWarning,
)
from .files import read_headers
from .frames import MalformedValueWarning
from .pacs import PACS, TLS
from .retrieve import RetrieveResult
from .storage import StoreResult
from .widgets import QueryForm

__all__ = [
    "PACS",
    "TLS",
    "AssociationError",
    "Cache",
    "CacheError",
    "CountMismatchWarning",
    "DICOMweb",
    "DimseError",
    "ExportResult",
    "HTTPError",
    "MalformedValueWarning",
    "MoveDestinationUnknown",
    "NotSupported",
    "PacsFrameError",
    "QueryError",
    "QueryForm",
    "ResultsCapped",
    "RetrieveResult",
    "StoreResult",
    "UnreadableFileWarning",
    "UnusableListingWarning",
    "Volume",
    "read_headers",
]

__version__ = "0.1.0"
