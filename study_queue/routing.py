"""Routing rules: which studies are analysed, by which models, and how urgently (issue 7).

The model selectors decide which *series* a model can read; routes decide which *studies*
are worth a worker's time at all, before anything is queued::

    [[routes]]
    name = "emergency CT"          # shown in logs and pacs-ai status
    calling_ae = "ER_CT"           # the sender's AE title (exact)
    modality = "CT"                # some series of the study has it
    body_part = "CHEST"            # some series' Body Part Examined (case-insensitive)
    series_description = "lung|chest"   # regular expression, searched case-insensitively
    priority = "urgent"            # urgent: its own queue, which workers take first
    models = ["lung-nodule-ct"]    # default: every model of inference.models
    action = "analyze"             # or "ignore"

Every condition given must hold; the first route that matches decides. Without any
``[[routes]]`` every study is analysed at normal priority; with routes, a study no route
matches ends IGNORED, saying so. The facts come from the journal (calling AE, modalities)
and from one header per series in the spool, read without pixel data.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from .settings import RouteSettings

log = logging.getLogger("pacs_ai.routing")


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    body_part: str
    description: str


@dataclass(frozen=True)
class StudyFacts:
    calling_ae: str
    series: tuple[SeriesFacts, ...]


def matches(route: RouteSettings, facts: StudyFacts) -> bool:
    if route.calling_ae and route.calling_ae != facts.calling_ae:
        return False
    series = list(facts.series)
    if route.modality:
        series = [s for s in series if s.modality.upper() == route.modality.upper()]
    if route.body_part:
        series = [s for s in series if s.body_part.upper() == route.body_part.upper()]
    if route.series_description:
        pattern = re.compile(route.series_description, re.IGNORECASE)
        series = [s for s in series if pattern.search(s.description)]
    if route.modality or route.body_part or route.series_description:
        return bool(series)  # one series meets every series condition
    return True


def choose(routes: list[RouteSettings], facts: StudyFacts) -> RouteSettings | None:
    """The first route that matches, or None."""
    return next((r for r in routes if matches(r, facts)), None)


def study_facts(spool_root: Path, study_uid: str, calling_ae: str | None, series: list[dict],
                relpaths: dict[str, str]) -> StudyFacts:
    """``relpaths``: one spooled instance per series UID (relative to the spool)."""
    facts = []
    for s in series:
        modality, body_part, description = s.get("modality") or "", "", ""
        rel = relpaths.get(s["series_uid"])
        if rel:
            try:
                ds = dcmread(spool_root / rel, stop_before_pixels=True,
                             specific_tags=["Modality", "BodyPartExamined", "SeriesDescription"])
                modality = str(ds.get("Modality", "") or modality)
                body_part = str(ds.get("BodyPartExamined", "") or "")
                description = str(ds.get("SeriesDescription", "") or "")
            except Exception as exc:  # noqa: BLE001 - an unreadable header matches on what the journal knows
                log.warning("series header unreadable for routing (%s)", type(exc).__name__)
        facts.append(SeriesFacts(modality, body_part, description))
    return StudyFacts(calling_ae or "", tuple(facts))
