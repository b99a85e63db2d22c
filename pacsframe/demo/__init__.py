"""The embedded demo PACS and the synthetic cohort it usually serves.

Examples
--------
>>> from pacsframe.demo import DemoPACS, make_cohort, serve
>>> DemoPACS("/tmp/nowhere", port=0)
DemoPACS('PFDEMO', stopped, folder='/tmp/nowhere', 0 instances)
"""

from __future__ import annotations

from .cohort import make_cohort
from .server import DemoPACS, serve
from .worklist import make_worklist, write_worklist

__all__ = ["DemoPACS", "make_cohort", "make_worklist", "serve", "write_worklist"]
