"""Lung-RADS v2022 baseline assessment category of a study, computed from its nodules.

What: ``assess(nodules)`` turns the model's nodule measurements into the study-level
Lung-RADS category (1, 2, 3, 4A or 4B), its descriptor, the recommended follow-up, and a
one-sentence reason naming the nodule and the rule row that drove it. The SR writer puts
these in the report (DESIGN.md section 6) with the coded concepts defined here.

Why: it is the treatment-decision support the project exists for, so it must be
explainable: the rules are one table of data (``RULES``), one row per rule as the ACR
writes it, each with its size bounds and whether each edge is inclusive, and every answer
points back at the row it came from.

Source: American College of Radiology, Lung CT Screening Reporting & Data System
(Lung-RADS) v2022, released November 2022, "Lung-RADS v2022 Assessment Categories"
(see ``SOURCE``); summarised with its evidence in Christensen J. et al., "ACR Lung-RADS
v2022: Assessment Categories and Management Recommendations", CHEST 2024;165(3):738-753.

Rules as applied here (baseline screening; sizes are mean diameters, the average of the
long and short axes, in mm, reported to one decimal place, so they are rounded with
``round_diameter`` before any comparison; "d" is the total mean diameter, "s" the mean
diameter of the solid component of a part-solid nodule):

- solid: d < 6 -> 2; 6 <= d < 8 -> 3; 8 <= d < 15 -> 4A; d >= 15 -> 4B.
- part-solid: d < 6 -> 2; d >= 6 with s < 6 -> 3; 6 <= s < 8 -> 4A; s >= 8 -> 4B.
  The ACR's 4A row also says "d >= 6"; since a solid part cannot be larger than its
  nodule, that condition is implied, and leaving it out makes the rows cover every input:
  an inconsistent measurement with s > d is sized by its solid part, the more cautious
  reading.
- ground-glass (the ACR's "non-solid", GGN): d < 30 -> 2; d >= 30 -> 3.
- no nodule -> 1. The study's category is the highest over its nodules
  (1 < 2 < 3 < 4A < 4B), as the ACR's "most suspicious nodule" rule asks; on a tie the
  first such nodule in the input is named.

What is deliberately not assigned, because the model cannot see it or there is no prior
study: category 0 (incomplete study, prior being located, suspected infection); 4X
(a category 3 or 4 nodule with additional features or imaging findings that increase
suspicion of lung cancer, e.g. spiculation, lymphadenopathy); the "S" modifier; benign
features that make a nodule category 1 (complete, central, popcorn or concentric-ring
calcification, fat); perifissural and juxtapleural nodules (category 2 below 10 mm);
airway nodules and atypical pulmonary cysts; and every rule about new, growing or stable
nodules, which needs a comparison study. The radiologist remains responsible for these;
the report marks its content as not verified (DESIGN.md section 6).

Coded concepts: no established code for the Lung-RADS categories or for the concept name
"Lung-RADS assessment category" is known here with certainty (neither in LOINC nor in
RadLex), so they use the private coding scheme ``99PACSAI`` (PS3.3 section 8.2:
designators beginning with "99" are private); an SR using them should declare the scheme
in its Coding Scheme Identification Sequence (0008,0110), from ``CODING_SCHEME``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from pydicom.sr.coding import Code

VERSION = "v2022"

SOURCE = (
    "American College of Radiology. Lung CT Screening Reporting & Data System (Lung-RADS) "
    "v2022, Assessment Categories, released November 2022. "
    "https://www.acr.org/Clinical-Resources/Reporting-and-Data-Systems/Lung-Rads"
)

NODULE_TYPES = ("solid", "part-solid", "ground-glass")

# Private coding scheme for concepts with no established code (PS3.3 section 8.2).
CODING_SCHEME_DESIGNATOR = "99PACSAI"
#: Values for an item of the Coding Scheme Identification Sequence (0008,0110), PS3.3 C.12.1.
CODING_SCHEME = {
    "CodingSchemeDesignator": CODING_SCHEME_DESIGNATOR,
    "CodingSchemeName": "pacs-ai private concepts",
    "CodingSchemeResponsibleOrganization": "pacs-ai",
}

#: Concept name of the study-level category (the value is one of ``CATEGORIES[...].code``).
CATEGORY_CONCEPT = Code("LRADS-CATEGORY", CODING_SCHEME_DESIGNATOR, "Lung-RADS assessment category")
#: Concept name of the recommended follow-up text that goes with the category.
MANAGEMENT_CONCEPT = Code("LRADS-MGMT", CODING_SCHEME_DESIGNATOR, "Lung-RADS recommended management")


@dataclass(frozen=True)
class Category:
    """One Lung-RADS v2022 assessment category: its descriptor and management as the ACR
    table words them, its rank (higher is more suspicious) and its code for the SR."""

    category: str
    descriptor: str
    management: str
    rank: int
    code: Code


def _category(category: str, rank: int, descriptor: str, management: str) -> Category:
    code = Code(f"LRADS-{category}", CODING_SCHEME_DESIGNATOR, f"Lung-RADS {VERSION} category {category}")
    return Category(category, descriptor, management, rank, code)


#: The categories this module can assign, in increasing order of suspicion (ACR v2022
#: "Category Descriptor" and "Management" columns).
CATEGORIES: dict[str, Category] = {
    c.category: c
    for c in (
        _category("1", 1, "Negative", "Continue annual screening with LDCT in 12 months."),
        _category("2", 2, "Benign appearance", "Continue annual screening with LDCT in 12 months."),
        _category("3", 3, "Probably benign", "6-month LDCT."),
        _category(
            "4A", 4, "Suspicious",
            "3-month LDCT; PET/CT may be considered if there is a >= 8 mm solid nodule or "
            "solid component.",
        ),
        _category(
            "4B", 5, "Very suspicious",
            "Diagnostic chest CT with or without contrast; PET/CT may be considered if there is "
            "a >= 8 mm solid nodule or solid component; tissue sampling; and/or referral for "
            "further clinical evaluation.",
        ),
    )
}


@dataclass(frozen=True)
class Interval:
    """A size range in mm; ``None`` for an open end. Every Lung-RADS v2022 size bound reads
    ">= lower, < upper", hence the defaults, but each row states its edges explicitly."""

    lower: float | None = None
    upper: float | None = None
    lower_inclusive: bool = True
    upper_inclusive: bool = False

    def contains(self, mm: float) -> bool:
        above_lower = (
            self.lower is None or mm > self.lower or (mm == self.lower and self.lower_inclusive)
        )
        below_upper = (
            self.upper is None or mm < self.upper or (mm == self.upper and self.upper_inclusive)
        )
        return above_lower and below_upper

    def describe(self, name: str) -> str:
        """The range as a reader writes it, e.g. ``8 mm <= d < 15 mm``."""
        lo = f"{self.lower:g} mm {'<=' if self.lower_inclusive else '<'} " if self.lower is not None else ""
        hi = f" {'<=' if self.upper_inclusive else '<'} {self.upper:g} mm" if self.upper is not None else ""
        if lo and hi:
            return f"{lo}{name}{hi}"
        if lo:
            return f"{name} {'>=' if self.lower_inclusive else '>'} {self.lower:g} mm"
        return f"{name}{hi}" if hi else f"any {name}"


ANY = Interval()


@dataclass(frozen=True)
class Rule:
    """One row of the ACR v2022 baseline table: a nodule of ``nodule_type`` whose rounded
    total mean diameter lies in ``total`` and whose solid component lies in ``solid``
    (part-solid only) is in ``category``."""

    id: str
    nodule_type: str
    total: Interval
    solid: Interval
    category: Category

    @property
    def descriptor(self) -> str:
        return self.category.descriptor

    @property
    def management(self) -> str:
        return self.category.management

    def matches(self, nodule_type: str, total_mm: float, solid_mm: float) -> bool:
        return (
            nodule_type == self.nodule_type
            and self.total.contains(total_mm)
            and self.solid.contains(solid_mm)
        )

    def criterion(self) -> str:
        """The row's condition in words, e.g. ``d >= 6 mm and solid component < 6 mm``."""
        named = ((self.total, "d"), (self.solid, "solid component"))
        return " and ".join(iv.describe(name) for iv, name in named if iv != ANY)


def _rule(id: str, nodule_type: str, category: str, total: Interval = ANY, solid: Interval = ANY) -> Rule:
    return Rule(id, nodule_type, total, solid, CATEGORIES[category])


#: Lung-RADS v2022 baseline rules (``SOURCE``), per nodule type, in order of category.
#: d = total mean diameter, s = solid-component mean diameter, both rounded to 0.1 mm.
RULES: tuple[Rule, ...] = (
    _rule("solid-2", "solid", "2", total=Interval(None, 6.0, True, False)),
    _rule("solid-3", "solid", "3", total=Interval(6.0, 8.0, True, False)),
    _rule("solid-4A", "solid", "4A", total=Interval(8.0, 15.0, True, False)),
    _rule("solid-4B", "solid", "4B", total=Interval(15.0, None, True, False)),
    _rule("part-solid-2", "part-solid", "2",
          total=Interval(None, 6.0, True, False), solid=Interval(None, 6.0, True, False)),
    _rule("part-solid-3", "part-solid", "3",
          total=Interval(6.0, None, True, False), solid=Interval(None, 6.0, True, False)),
    _rule("part-solid-4A", "part-solid", "4A", solid=Interval(6.0, 8.0, True, False)),
    _rule("part-solid-4B", "part-solid", "4B", solid=Interval(8.0, None, True, False)),
    _rule("ground-glass-2", "ground-glass", "2", total=Interval(None, 30.0, True, False)),
    _rule("ground-glass-3", "ground-glass", "3", total=Interval(30.0, None, True, False)),
)


@dataclass(frozen=True)
class NoduleMeasure:
    """One nodule as Lung-RADS sizes it: its type, its mean diameter (mm) and, for a
    part-solid nodule, the mean diameter of its solid component (ignored otherwise)."""

    type: str
    mean_diameter_mm: float
    solid_component_mm: float = 0.0


@dataclass(frozen=True)
class Assessment:
    """The study-level result: category, its descriptor and management, why (one
    sentence naming the rule row), and which input nodule drove it (None for category 1)."""

    category: str
    descriptor: str
    management: str
    reason: str
    nodule_index: int | None
    version: str = VERSION

    @property
    def code(self) -> Code:
        """The category's coded concept for the SR (value of ``CATEGORY_CONCEPT``)."""
        return CATEGORIES[self.category].code


def round_diameter(mm: float) -> float:
    """Round a diameter to one decimal place, halves up (5.95 -> 6.0, 5.94 -> 5.9).

    Lung-RADS v2022 reports mean diameters to one decimal place and compares those with
    its thresholds. The float's shortest decimal form is rounded (via ``repr``), so 5.95,
    whose binary value lies a hair below 5.95, still rounds up as a reader would.
    """
    value = float(mm)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a diameter must be a finite number >= 0 mm, got {value!r}")
    return float(Decimal(repr(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _measure(index: int, nodule: object) -> tuple[str, float, float]:
    """Type and rounded sizes of one input (a NoduleMeasure or any object with the same
    attributes, such as ``inference.findings.Finding``)."""
    try:
        nodule_type = nodule.type  # type: ignore[attr-defined]
        total = nodule.mean_diameter_mm  # type: ignore[attr-defined]
    except AttributeError as exc:
        raise TypeError(
            f"nodule {index} has no {exc.name or 'type or mean_diameter_mm'} attribute"
        ) from exc
    if nodule_type not in NODULE_TYPES:
        raise ValueError(
            f"nodule {index} has unknown type {nodule_type!r}; expected one of {', '.join(NODULE_TYPES)}"
        )
    solid = 0.0
    if nodule_type == "part-solid":
        if not hasattr(nodule, "solid_component_mm"):
            raise TypeError(f"part-solid nodule {index} has no solid_component_mm attribute")
        solid = round_diameter(nodule.solid_component_mm)  # type: ignore[attr-defined]
    return nodule_type, round_diameter(total), solid


def _rule_for(nodule_type: str, total: float, solid: float) -> Rule:
    for rule in RULES:
        if rule.matches(nodule_type, total, solid):
            return rule
    # Unreachable while RULES covers every size of every type (tests check it).
    raise ValueError(f"no Lung-RADS rule for a {nodule_type} nodule of {total} mm / {solid} mm")


def assess(nodules: Iterable[NoduleMeasure]) -> Assessment:
    """The Lung-RADS v2022 baseline category of a study from its nodules.

    Each nodule is placed by the first row of ``RULES`` its type and rounded sizes match;
    the study takes the highest category, and the first nodule reaching it is named.
    No nodule gives category 1. Raises ValueError for an unknown nodule type or a size
    that is not a finite number >= 0, TypeError for an object lacking the attributes.
    """
    best: tuple[Rule, int, float, float] | None = None
    for index, nodule in enumerate(nodules):
        nodule_type, total, solid = _measure(index, nodule)
        rule = _rule_for(nodule_type, total, solid)
        if best is None or rule.category.rank > best[0].category.rank:
            best = (rule, index, total, solid)

    if best is None:
        cat = CATEGORIES["1"]
        return Assessment(
            category=cat.category,
            descriptor=cat.descriptor,
            management=cat.management,
            reason=f"no lung nodule found -> 1 (Lung-RADS {VERSION} baseline)",
            nodule_index=None,
        )

    rule, index, total, solid = best
    sizes = f"mean diameter {total:.1f} mm"
    if rule.nodule_type == "part-solid":
        sizes += f", solid component {solid:.1f} mm"
    reason = (
        f"{rule.nodule_type} nodule, {sizes}: {rule.criterion()} at baseline -> "
        f"{rule.category.category} (Lung-RADS {VERSION} rule {rule.id})"
    )
    return Assessment(
        category=rule.category.category,
        descriptor=rule.descriptor,
        management=rule.management,
        reason=reason,
        nodule_index=index,
    )
