"""pacsframe: query a PACS into typed pandas DataFrames, retrieve into a safe cache.

Examples
--------
>>> import pacsframe as pf
>>> pacs = pf.PACS("127.0.0.1", 4242, ae_title="ORTHANC")
>>> sorted(pf.__all__)[:3]
['AssociationError', 'CacheError', 'DimseError']
"""

from .connection import PACS
from .errors import (
    AssociationError,
    CacheError,
    DimseError,
    MoveDestinationUnknown,
    NotSupported,
    PacsFrameError,
    QueryError,
)
from .frames import MalformedValueWarning
from .storage import StoreResult

__all__ = [
    "PACS",
    "AssociationError",
    "CacheError",
    "DimseError",
    "MalformedValueWarning",
    "MoveDestinationUnknown",
    "NotSupported",
    "PacsFrameError",
    "QueryError",
    "StoreResult",
]

__version__ = "0.1.0"
