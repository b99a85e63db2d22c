"""A point-and-click query form: :class:`QueryModel` (logic) and :class:`QueryForm` (view).

The form works over either backend, a :class:`~pacsframe.PACS` (C-FIND, C-GET) or a
:class:`~pacsframe.DICOMweb` archive (QIDO-RS, WADO-RS): it calls only what both
offer (``find``, ``get``, ``cache``). It has no move button, since DICOMweb has no move.
Over DICOMweb a patient row is retrieved through its studies (WADO-RS has no patient
level).

The split follows ipywidgets' own ``interaction.py``: everything that decides
what to send, runs the search, formats rows and retrieves lives in
:class:`QueryModel`, plain Python that never imports ipywidgets, so it is tested
and usable without a browser or a kernel. :class:`QueryForm` builds the widgets
(importing ipywidgets only when a form is built) and binds them to a model.

Examples
--------
>>> import tempfile
>>> import pacsframe as pf
>>> model = QueryModel(pf.PACS("127.0.0.1", 4242, ae_title="ORTHANC", cache=tempfile.mkdtemp()))
>>> model.level = "series"
>>> model.fields["PatientID"] = "PF1*"
>>> model.modalities = ["CT"]
>>> model.query
{'PatientID': 'PF1*', 'Modality': 'CT'}
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from . import frames
from .errors import PacsFrameError, QueryError
from .matching import LEVEL_KEYWORDS
from .query import INSTANCE_COUNT_KEY, UNIQUE_KEY, build_query, encode_value, normalize_level

if TYPE_CHECKING:
    from .dicomweb import DICOMweb
    from .pacs import PACS
    from .retrieve import RetrieveResult

__all__ = ["MODALITIES", "QueryForm", "QueryModel", "parse_more_keys"]

LOGGER = logging.getLogger("pacsframe")

#: Modality codes offered by the form's multi-select.
MODALITIES = ("CT", "MR", "CR", "DX", "US", "PT", "NM", "XA", "MG", "SR", "SEG", "OT")

#: The free-text fields of the form, in display order.
TEXT_FIELDS = ("PatientID", "PatientName", "AccessionNumber", "StudyDescription")

# Which form fields make sense at each level. Series and image searches start from
# studies (study-root needs a StudyInstanceUID below STUDY level), so study fields
# stay useful there.
_LEVEL_FIELDS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientName"),
    "STUDY": (*TEXT_FIELDS, "Modality", "StudyDate"),
    "SERIES": (*TEXT_FIELDS, "Modality", "StudyDate"),
    "IMAGE": (*TEXT_FIELDS, "Modality", "StudyDate"),
}

# Columns shown per level in the results list: (keyword, header, max width).
_DISPLAY: dict[str, tuple[tuple[str, str, int], ...]] = {
    "PATIENT": (
        ("PatientID", "Patient ID", 16),
        ("PatientName", "Name", 28),
        ("PatientBirthDate", "Born", 10),
        ("PatientSex", "Sex", 3),
        ("NumberOfPatientRelatedStudies", "Studies", 7),
        ("NumberOfPatientRelatedInstances", "Images", 7),
    ),
    "STUDY": (
        ("PatientID", "Patient ID", 16),
        ("PatientName", "Name", 24),
        ("StudyDate", "Date", 10),
        ("ModalitiesInStudy", "Mod", 8),
        ("AccessionNumber", "Accession", 16),
        ("StudyDescription", "Description", 28),
        ("NumberOfStudyRelatedInstances", "Images", 6),
    ),
    "SERIES": (
        ("PatientID", "Patient ID", 16),
        ("StudyDate", "Date", 10),
        ("SeriesNumber", "Ser", 4),
        ("Modality", "Mod", 4),
        ("SeriesDescription", "Description", 28),
        ("NumberOfSeriesRelatedInstances", "Images", 6),
    ),
    "IMAGE": (
        ("PatientID", "Patient ID", 16),
        ("SeriesNumber", "Ser", 4),
        ("Modality", "Mod", 4),
        ("InstanceNumber", "#", 5),
        ("Rows", "Rows", 5),
        ("Columns", "Cols", 5),
        ("SOPInstanceUID", "SOP Instance UID", 64),
    ),
}

_NOUNS = {
    "PATIENT": ("patient", "patients"),
    "STUDY": ("study", "studies"),
    "SERIES": ("series", "series"),
    "IMAGE": ("image", "images"),
}

# Rows rendered in the HTML table: a browser chokes on thousands of rows, and the
# whole frame is on ``form.result`` anyway.
_TABLE_ROWS = 200


def _plural(n: int, level: str) -> str:
    one, many = _NOUNS[level]
    return f"{n} {one if n == 1 else many}"


def parse_more_keys(text: str) -> dict[str, str]:
    """Parse the "more keys" box: ``Keyword=value; Keyword2=value2``.

    Keywords may be DICOM keywords or snake_case; separators are ``;`` or new
    lines; an empty value (``SeriesDescription=``) asks for the attribute
    without matching on it. Values are validated later by
    :func:`~pacsframe.query.build_query`.

    Raises
    ------
    QueryError
        When a part is not ``Keyword=value``, names no DICOM keyword, or repeats one.

    Examples
    --------
    >>> parse_more_keys("SeriesDescription=*AX*; body_part_examined = HEAD")
    {'SeriesDescription': '*AX*', 'BodyPartExamined': 'HEAD'}
    >>> parse_more_keys("")
    {}
    """
    keys: dict[str, str] = {}
    for raw in text.replace("\n", ";").split(";"):
        part = raw.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise QueryError(
                f"{part!r} in more keys is not Keyword=value; write e.g. "
                "SeriesDescription=*AX*; BodyPartExamined=HEAD."
            )
        keyword = frames.normalize_keyword(name.strip())
        if keyword in keys:
            raise QueryError(f"{keyword} appears twice in more keys; give it once.")
        keys[keyword] = value.strip()
    return keys


def _cell(value: Any) -> str:
    """One value as short display text (dates as ISO, lists joined)."""
    if isinstance(value, (list, tuple)):
        return "/".join(_cell(v) for v in value)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d")
    return str(value)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class QueryModel:
    """The state and actions of a query form, without any widget.

    Parameters
    ----------
    pacs : PACS or DICOMweb
        The peer to search and retrieve from.
    workers : int
        Parallel associations (or HTTP requests) for retrieval.

    Attributes
    ----------
    level : str
        ``"patient"``, ``"study"``, ``"series"`` or ``"image"``.
    fields : dict of str to str
        The text fields (:data:`TEXT_FIELDS`); empty means "do not match".
    modalities : list of str
        Chosen modality codes (``ModalitiesInStudy`` at study level,
        ``Modality`` below; several codes below study level are matched by
        filtering the answer, as ``Modality`` takes no list).
    date_from, date_to : datetime.date or None
        The ``StudyDate`` range; ``None`` leaves that end open.
    more : str
        Further keys, ``Keyword=value; Keyword2=value2`` (see :func:`parse_more_keys`).
    result : DataFrame or None
        The last search's frame.
    selected : DataFrame
        The selected rows of :attr:`result`.
    retrieved : RetrieveResult or None
        The last retrieval.
    status, status_kind : str
        A sentence for the user and ``"info"``, ``"ok"`` or ``"error"``.

    Examples
    --------
    >>> import tempfile, datetime
    >>> import pacsframe as pf
    >>> model = QueryModel(pf.PACS("127.0.0.1", 4242, cache=tempfile.mkdtemp()))
    >>> model.date_from = datetime.date(2026, 3, 1)
    >>> model.more = "StudyID=42"
    >>> model.query
    {'StudyDate': '20260301-', 'StudyID': '42'}
    >>> model.more = "StudyDate=2026*"
    >>> model.search()
    False
    >>> model.status_kind, model.status.startswith("StudyDate is set both")
    ('error', True)
    """

    def __init__(self, pacs: PACS | DICOMweb, *, workers: int = 4) -> None:
        self.pacs = pacs
        self.workers = workers
        self.level = "study"
        self.fields: dict[str, str] = dict.fromkeys(TEXT_FIELDS, "")
        self.modalities: list[str] = []
        self.date_from: _dt.date | None = None
        self.date_to: _dt.date | None = None
        self.more = ""
        self.result: pd.DataFrame | None = None
        self.selection: list[int] = []
        self.retrieved: RetrieveResult | None = None
        self.status = ""
        self.status_kind = "info"
        self.progress_value = 0
        self.progress_max: int | None = None

    # --- what would be sent ---------------------------------------------------------

    @property
    def level_name(self) -> str:
        """The level in DICOM form (``"STUDY"``)."""
        return normalize_level(self.level)

    def field_names(self) -> tuple[str, ...]:
        """The form fields that apply at the current level."""
        return _LEVEL_FIELDS[self.level_name]

    def _keys(self) -> tuple[dict[str, Any], list[str]]:
        """Raw matching keys from the fields, and the modality codes to filter by."""
        level = self.level_name
        applicable = self.field_names()
        keys: dict[str, Any] = {}
        for name in TEXT_FIELDS:
            value = self.fields.get(name, "").strip()
            if value and name in applicable:
                keys[name] = value
        codes = [str(c).strip().upper() for c in self.modalities if str(c).strip()]
        post_filter: list[str] = []
        if codes and "Modality" in applicable:
            if level == "STUDY":
                keys["ModalitiesInStudy"] = codes
            elif len(codes) == 1:
                keys["Modality"] = codes[0]
            else:
                post_filter = codes
        if (self.date_from or self.date_to) and "StudyDate" in applicable:
            if self.date_from and self.date_to and self.date_from > self.date_to:
                raise QueryError(
                    f"the study date range starts after it ends ({self.date_from} > "
                    f"{self.date_to}); swap the From and To dates."
                )
            keys["StudyDate"] = (self.date_from, self.date_to)
        for keyword, value in parse_more_keys(self.more).items():
            if keyword in keys or (keyword == "Modality" and post_filter):
                raise QueryError(
                    f"{keyword} is set both in its field and in more keys; give it once."
                )
            keys[keyword] = value
        return keys, post_filter

    def _stages(self) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
        """The C-FIND levels to run in order, each with its keys, and a modality filter.

        Below study level a search finds studies first and drills down, so each key
        goes to the highest level that knows it (patient and study attributes to
        the study query), anything else to the level asked for.
        """
        keys, post_filter = self._keys()
        level = self.level_name
        if level in ("PATIENT", "STUDY"):
            return [(level, keys)], post_filter
        chain = ["STUDY", "SERIES"] if level == "SERIES" else ["STUDY", "SERIES", "IMAGE"]
        stages: dict[str, dict[str, Any]] = {lv: {} for lv in chain}
        for keyword, value in keys.items():
            home = next((lv for lv in chain if keyword in LEVEL_KEYWORDS[lv]), level)
            stages[home][keyword] = value
        if post_filter:
            # The study query can at least skip studies without any of the codes.
            stages["STUDY"].setdefault("ModalitiesInStudy", post_filter)
        return list(stages.items()), post_filter

    def _model(self) -> str:
        return "patient" if self.level_name == "PATIENT" else "study"

    @property
    def web(self) -> bool:
        """Whether the peer is a DICOMweb archive (QIDO-RS/WADO-RS) rather than DIMSE."""
        return self.pacs.peer.get("protocol") == "DICOMweb"

    @property
    def retrieve_help(self) -> str:
        """What Retrieve does over this peer, in a sentence (the button's tooltip)."""
        if self.web:
            return (
                "WADO-RS the selected rows into the cache (objects already cached are "
                "skipped). DICOMweb has no move: objects come only to this client."
            )
        return "C-GET the selected rows into the cache (objects already cached are skipped)."

    @property
    def query(self) -> dict[str, str]:
        """The matching keys the form would send, validated, in DICOM string form.

        Keys of every stage are merged (a series search sends the study keys to
        find studies first); several modality codes below study level appear as
        ``Modality='CT\\\\MR'`` although they are matched by filtering the answer.

        Raises
        ------
        QueryError
            When a value or keyword is wrong (nothing is sent).
        """
        stages, post_filter = self._stages()
        merged: dict[str, str] = {}
        for level, keys in stages:
            merged.update(build_query(level, self._model(), keys).matching)
        if post_filter:
            merged["Modality"] = "\\".join(encode_value("Modality", c) for c in post_filter)
        return merged

    # --- actions --------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> bool:
        if isinstance(exc, PacsFrameError):
            self.status = str(exc)
        else:
            # Not ours: still a sentence in the form, the traceback goes to the log.
            LOGGER.exception("query form: unexpected error")
            self.status = f"Unexpected error ({type(exc).__name__}): {exc}"
        self.status_kind = "error"
        return False

    def search(self) -> bool:
        """Run the search; set :attr:`result` and :attr:`status`. Never raises.

        Returns
        -------
        bool
            Whether the search succeeded.
        """
        try:
            stages, post_filter = self._stages()
            model = self._model()
            # Validate every stage before the first one is sent.
            queries = [build_query(level, model, keys) for level, keys in stages]
            frame: pd.DataFrame | None = None
            for (level, keys), query in zip(stages, queries, strict=True):
                if frame is not None and frame.empty:
                    frame = frames.empty_frame(query.columns)
                    break
                frame = self.pacs.find(level, frame, model=model, **keys)
                if level == "SERIES" and post_filter and "Modality" in frame.columns:
                    frame = frame[frame["Modality"].isin(post_filter)].reset_index(drop=True)
        except Exception as exc:
            return self._fail(exc)
        assert frame is not None
        self.result = frame.reset_index(drop=True)
        self.selection = []
        found = f"{_plural(len(self.result), self.level_name)} found"
        if len(stages) > 1 and len(self.result):
            parents = self.result["StudyInstanceUID"].nunique()
            found += f" in {_plural(parents, 'STUDY')}"
        self.status = f"{found}."
        self.status_kind = "ok"
        return True

    def select(self, rows: Iterable[int]) -> None:
        """Select rows of :attr:`result` by position."""
        n = 0 if self.result is None else len(self.result)
        self.selection = sorted({int(r) for r in rows if 0 <= int(r) < n})

    @property
    def selected(self) -> pd.DataFrame:
        """The selected rows of :attr:`result` (an empty frame before any search)."""
        if self.result is None:
            return pd.DataFrame()
        return self.result.iloc[self.selection]

    def expected(self, rows: pd.DataFrame) -> int | None:
        """How many objects retrieving ``rows`` brings, when the counts are known."""
        level = self.level_name
        key = UNIQUE_KEY[level]
        if key in rows.columns:
            rows = rows.drop_duplicates(key)
        if level == "IMAGE":
            return len(rows)
        column = INSTANCE_COUNT_KEY[level]
        if column not in rows.columns or rows[column].isna().any():
            return None
        return int(rows[column].sum())

    def _already_cached(self, rows: pd.DataFrame) -> int:
        level = self.level_name
        uids = rows[UNIQUE_KEY[level]].dropna().astype(str).unique().tolist()
        if level == "IMAGE":
            return len(self.pacs.cache.cached(uids))
        return sum(self.pacs.cache.count(level, uids).values())

    def retrieve(self, on_progress: Callable[[int, int | None], Any] | None = None) -> bool:
        """Retrieve the selected rows into the cache; set :attr:`retrieved`. Never raises.

        C-GET from a :class:`~pacsframe.PACS`, WADO-RS from a
        :class:`~pacsframe.DICOMweb` archive (patients through their studies there).

        Parameters
        ----------
        on_progress : callable, optional
            ``on_progress(done, expected)`` as objects arrive (from the retrieval's
            worker threads); ``expected`` is None when the peer gave no counts.

        Returns
        -------
        bool
            Whether the retrieval ran without an error (failed objects are counted
            in :attr:`retrieved`, not an error).
        """
        rows = self.selected
        if rows.empty:
            self.status = "Select one or more rows in the results, then click Retrieve."
            self.status_kind = "error"
            return False
        lock = threading.Lock()
        try:
            expected = self.expected(rows)
            done = self._already_cached(rows)
        except Exception as exc:
            return self._fail(exc)
        self.progress_max, self.progress_value = expected, done
        if on_progress is not None:
            on_progress(done, expected)

        def received(path: str, meta: dict[str, Any]) -> None:
            with lock:
                self.progress_value += 1
                value = self.progress_value
            if on_progress is not None:
                on_progress(value, expected)

        options: dict[str, Any] = {}
        if self.level_name == "PATIENT" and not self.web:
            options["model"] = "patient"
        try:
            if self.level_name == "PATIENT" and self.web:
                # WADO-RS has no patient level: retrieve the patients' studies.
                rows = self.pacs.find_studies(rows[["PatientID"]], progress=False)
            result = self.pacs.get(
                rows, workers=self.workers, progress=False, on_received=received, **options
            )
        except Exception as exc:
            return self._fail(exc)
        self.retrieved = result
        self.progress_value = result.completed + result.cached + result.warning
        self.progress_max = self.progress_value + result.failed
        if on_progress is not None:
            on_progress(self.progress_value, self.progress_max)
        warned = f", {result.warning} with warnings" if result.warning else ""
        self.status = (
            f"Retrieved {result.completed} objects ({result.failed} failed, "
            f"{result.cached} already cached{warned})."
        )
        self.status_kind = "error" if result.failed else "ok"
        return True

    # --- presentation (plain text and HTML; no widgets) --------------------------------

    def _display_columns(self) -> list[tuple[str, str, int]]:
        frame = self.result if self.result is not None else pd.DataFrame()
        return [c for c in _DISPLAY[self.level_name] if c[0] in frame.columns]

    def _widths(self) -> list[int]:
        assert self.result is not None
        widths = []
        for keyword, header, cap in self._display_columns():
            longest = max((len(_cell(v)) for v in self.result[keyword]), default=0)
            widths.append(min(cap, max(len(header), longest)))
        return widths

    def header_line(self) -> str:
        """Column headers aligned with :meth:`option_lines`."""
        if self.result is None:
            return ""
        cols = self._display_columns()
        cells = [_fit(h, w).ljust(w) for (_, h, _), w in zip(cols, self._widths(), strict=True)]
        return "  ".join(["#".rjust(len(str(len(self.result)))), *cells]).rstrip()

    def option_lines(self) -> list[str]:
        """One fixed-width line per result row (numbered, so lines stay distinct)."""
        if self.result is None:
            return []
        cols = self._display_columns()
        widths = self._widths()
        number = len(str(len(self.result)))
        lines = []
        for position, row in enumerate(self.result[[c[0] for c in cols]].itertuples(False)):
            cells = [_fit(_cell(v), w).ljust(w) for v, w in zip(row, widths, strict=True)]
            lines.append("  ".join([str(position + 1).rjust(number), *cells]).rstrip())
        return lines

    def table_html(self) -> str:
        """The selected rows (or all rows when none is selected) as an HTML table."""
        if self.result is None:
            return ""
        rows = self.selected if self.selection else self.result
        what = "Selected" if self.selection else "Results"
        columns = [c[0] for c in self._display_columns()]
        key = UNIQUE_KEY[self.level_name]
        if key in rows.columns and key not in columns:
            columns.append(key)
        shown = rows[columns].head(_TABLE_ROWS).copy()
        for column in shown.columns:
            shown[column] = [_cell(v) for v in shown[column]]
        more = f", first {_TABLE_ROWS} shown" if len(rows) > _TABLE_ROWS else ""
        caption = f"<p><b>{what}</b> ({_plural(len(rows), self.level_name)}{more})</p>"
        return caption + shown.to_html(index=False, classes="pf-table", border=0)

    def status_html(self) -> str:
        """:attr:`status` as HTML (escaped; colour by kind)."""
        colour = {"error": "#b00020", "ok": "#1b5e20"}.get(self.status_kind, "inherit")
        return (
            f'<span class="pf-status-text pf-status-{self.status_kind}" '
            f'data-kind="{self.status_kind}" style="color:{colour}">'
            f"{html.escape(self.status, quote=False)}</span>"
        )


_STYLE = """<style>
.pf-results select, .pf-results-header pre { font-family: monospace; font-size: 12px; }
.pf-results-header pre { margin: 0 0 0 4px; }
.pf-table td, .pf-table th { padding: 1px 8px; text-align: left; }
</style>"""


class QueryForm:
    """An ipywidgets form that searches a PACS or a DICOMweb archive and retrieves rows.

    Display it with ``display(form)``, by leaving it last in a cell, or through
    ``form.widget`` (a ``VBox``). Everything the buttons do is also callable:
    :meth:`search`, :meth:`retrieve`; errors appear as a sentence in the status
    line and are never raised out of a click.

    Parameters
    ----------
    pacs : PACS or DICOMweb
        The peer to search (C-FIND or QIDO-RS) and retrieve from (C-GET or WADO-RS).
        There is no move button: DICOMweb has no move, and ``pacs.move`` is a call away.
    workers : int
        Parallel associations (or HTTP requests) for retrieval.

    Attributes
    ----------
    model : QueryModel
        The logic behind the form.
    widget : ipywidgets.VBox
        The whole form (CSS class ``pf-query-form``).
    level, patient_id, patient_name, accession_number, study_description, modality,
    date_from, date_to, more_keys, search_button, results, table, retrieve_button,
    progress, status : ipywidgets.Widget
        The controls, for tests and for wiring into other layouts.

    Notes
    -----
    CSS selectors for browser tests (ipywidgets 8 puts the class on the widget's
    outer element):

    ========================  =====================================================
    level toggle buttons      ``.pf-level button`` (labels Patient/Study/Series/Image)
    Patient ID                ``.pf-patient-id input``
    Patient name              ``.pf-patient-name input``
    Accession number          ``.pf-accession-number input``
    Study description         ``.pf-study-description input``
    modality multi-select     ``.pf-modality select``
    study date from / to      ``.pf-date-from input``, ``.pf-date-to input`` (type=date)
    more keys                 ``.pf-more-keys input``
    Search button             ``button.pf-search``
    results list              ``.pf-results select`` (one ``option`` per row)
    results header            ``.pf-results-header pre``
    rows table                ``.pf-table`` (the ``<table>`` of selected/all rows)
    Retrieve button           ``button.pf-retrieve``
    progress bar              ``.pf-progress``
    status line               ``.pf-status`` (its ``.pf-status-text`` carries
                              ``data-kind`` = info, ok or error)
    whole form                ``.pf-query-form``
    ========================  =====================================================

    Examples
    --------
    >>> import tempfile, datetime
    >>> import pacsframe as pf
    >>> form = pf.QueryForm(pf.PACS("127.0.0.1", 4242, ae_title="ORTHANC",
    ...                             cache=tempfile.mkdtemp()))
    >>> form.level.value = "study"
    >>> form.patient_id.value = "PF1*"
    >>> form.modality.value = ("CT", "MR")
    >>> form.date_to.value = datetime.date(2026, 4, 6)
    >>> form.query
    {'PatientID': 'PF1*', 'StudyDate': '-20260406', 'ModalitiesInStudy': 'CT\\\\MR'}
    >>> form.more_keys.value = "Bogus=1"
    >>> form.search_button.click()
    >>> "not a DICOM keyword" in form.status.value
    True
    """

    def __init__(self, pacs: PACS | DICOMweb, *, workers: int = 4) -> None:
        import ipywidgets as w

        self.model = QueryModel(pacs, workers=workers)
        self._last_push = 0.0
        wide = w.Layout(width="24em")
        style = {"description_width": "9em"}

        def text(name: str, description: str, placeholder: str, css: str) -> Any:
            box = w.Text(
                description=description, placeholder=placeholder, layout=wide, style=style
            )
            box.add_class(css)
            box.observe(lambda change: self._set_field(name, change["new"]), "value")
            return box

        self.level = w.ToggleButtons(
            options=[
                ("Patient", "patient"),
                ("Study", "study"),
                ("Series", "series"),
                ("Image", "image"),
            ],
            value="study",
            description="Level",
            style={**style, "button_width": "6em"},
        )
        self.level.add_class("pf-level")
        self.patient_id = text("PatientID", "Patient ID", "e.g. 12345 or PF*", "pf-patient-id")
        self.patient_name = text(
            "PatientName", "Patient name", "e.g. SMITH^* (family^given)", "pf-patient-name"
        )
        self.accession_number = text(
            "AccessionNumber", "Accession", "e.g. A123*", "pf-accession-number"
        )
        self.study_description = text(
            "StudyDescription", "Description", "e.g. *CHEST*", "pf-study-description"
        )
        self.modality = w.SelectMultiple(
            options=list(MODALITIES),
            description="Modality",
            rows=6,
            style=style,
            layout=w.Layout(width="16em"),
        )
        self.modality.add_class("pf-modality")
        self.date_from = w.DatePicker(description="Study date from", style=style)
        self.date_from.add_class("pf-date-from")
        self.date_to = w.DatePicker(description="to", style={"description_width": "2em"})
        self.date_to.add_class("pf-date-to")
        self.more_keys = w.Text(
            description="More keys",
            placeholder="Keyword=value; Keyword2=value2",
            layout=w.Layout(width="40em"),
            style=style,
        )
        self.more_keys.add_class("pf-more-keys")
        self.search_button = w.Button(description="Search", button_style="primary", icon="search")
        self.search_button.add_class("pf-search")
        self.results_header = w.HTML()
        self.results_header.add_class("pf-results-header")
        self.results = w.SelectMultiple(
            options=[], rows=8, description="", layout=w.Layout(width="100%")
        )
        self.results.add_class("pf-results")
        self.retrieve_button = w.Button(
            description="Retrieve", icon="download", tooltip=self.model.retrieve_help
        )
        self.retrieve_button.add_class("pf-retrieve")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="Retrieved")
        self.progress.add_class("pf-progress")
        self.status = w.HTML()
        self.status.add_class("pf-status")
        self.table = w.HTML()
        self.table.add_class("pf-table-box")
        self.retrieved_box = w.HTML()
        self.retrieved_box.add_class("pf-retrieved")

        self.modality.observe(lambda c: setattr(self.model, "modalities", list(c["new"])), "value")
        self.date_from.observe(lambda c: setattr(self.model, "date_from", c["new"]), "value")
        self.date_to.observe(lambda c: setattr(self.model, "date_to", c["new"]), "value")
        self.more_keys.observe(lambda c: setattr(self.model, "more", c["new"]), "value")
        self.level.observe(self._on_level, "value")
        self.results.observe(self._on_select, "value")
        self.search_button.on_click(lambda _: self.search())
        self.retrieve_button.on_click(lambda _: self.retrieve())

        self._rows = {
            "PatientID": self.patient_id,
            "PatientName": self.patient_name,
            "AccessionNumber": self.accession_number,
            "StudyDescription": self.study_description,
            "Modality": self.modality,
            "StudyDate": w.HBox([self.date_from, self.date_to]),
        }
        fields = w.VBox([self.level, *self._rows.values(), self.more_keys, self.search_button])
        self.widget = w.VBox(
            [
                w.HTML(_STYLE),
                fields,
                self.status,
                self.results_header,
                self.results,
                w.HBox([self.retrieve_button, self.progress]),
                self.retrieved_box,
                self.table,
            ]
        )
        self.widget.add_class("pf-query-form")
        self._show_fields()
        self._refresh()

    # --- binding ----------------------------------------------------------------------

    def _set_field(self, name: str, value: str) -> None:
        self.model.fields[name] = value

    def _on_level(self, change: Mapping[str, Any]) -> None:
        self.model.level = change["new"]
        self._show_fields()

    def _show_fields(self) -> None:
        wanted = self.model.field_names()
        for name, box in self._rows.items():
            box.layout.display = None if name in wanted else "none"

    def _on_select(self, change: Mapping[str, Any]) -> None:
        self.model.select(change["new"])
        self.table.value = self.model.table_html()

    def _refresh(self) -> None:
        self.status.value = self.model.status_html()

    def _set_progress(self, done: int, expected: int | None) -> None:
        # Called from retrieval worker threads: send at most ~10 updates a second,
        # plus the last one, so a large retrieval does not flood the comm channel.
        now = time.monotonic()
        last = expected is not None and done >= expected
        if not last and now - self._last_push < 0.1:
            return
        self._last_push = now
        top = expected if expected is not None else done + 1
        self.progress.max = max(top, 1)
        self.progress.value = min(done, self.progress.max)

    # --- public -------------------------------------------------------------------------

    @property
    def query(self) -> dict[str, str]:
        """The validated matching keys the form would send (see :attr:`QueryModel.query`)."""
        return self.model.query

    @property
    def result(self) -> pd.DataFrame | None:
        """The last search's frame (None before the first search)."""
        return self.model.result

    @property
    def selected(self) -> pd.DataFrame:
        """The rows selected in the results list."""
        return self.model.selected

    @property
    def retrieved(self) -> RetrieveResult | None:
        """The last :class:`~pacsframe.RetrieveResult`."""
        return self.model.retrieved

    def search(self) -> bool:
        """What the Search button does; returns whether it succeeded. Never raises."""
        self.search_button.disabled = True
        self.model.status, self.model.status_kind = "Searching…", "info"
        self._refresh()
        try:
            ok = self.model.search()
            if ok:
                lines = self.model.option_lines()
                header = html.escape(self.model.header_line())
                self.results_header.value = f"<pre>{header}</pre>"
                self.results.options = [(line, i) for i, line in enumerate(lines)]
                self.results.rows = min(max(len(lines), 3), 15)
                self.results.value = ()
                self.table.value = self.model.table_html()
                self.progress.value = 0
            return ok
        except Exception as exc:  # a widget-side failure is still a sentence, not a traceback
            return self.model._fail(exc)
        finally:
            self.search_button.disabled = False
            self._refresh()

    def retrieve(self) -> bool:
        """What the Retrieve button does; returns whether it succeeded. Never raises."""
        self.retrieve_button.disabled = True
        self.model.status, self.model.status_kind = "Retrieving…", "info"
        self._refresh()
        self._last_push = 0.0
        try:
            ok = self.model.retrieve(self._set_progress)
            if ok and self.model.retrieved is not None:
                self.progress.max = max(self.model.progress_max or 0, 1)
                self.progress.value = min(self.model.progress_value, self.progress.max)
                self.retrieved_box.value = self.model.retrieved._repr_html_()
            return ok
        except Exception as exc:
            return self.model._fail(exc)
        finally:
            self.retrieve_button.disabled = False
            self._refresh()

    def select(self, rows: Sequence[int]) -> None:
        """Select result rows by position, as clicking them would."""
        self.results.value = tuple(int(r) for r in rows)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        n = "no search yet" if self.result is None else f"{len(self.result)} rows"
        return f"QueryForm({self.model.pacs!r}, level={self.model.level!r}, {n})"
