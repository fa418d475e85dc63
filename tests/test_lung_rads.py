"""Lung-RADS v2022 baseline categories: every boundary of every rule row on both sides,
rounding at the edges, the study-level maximum, and input checking. Pure functions, no
I/O: the whole file runs in milliseconds."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from dicom_node.lung_rads import (
    CATEGORIES,
    CATEGORY_CONCEPT,
    CODING_SCHEME_DESIGNATOR,
    MANAGEMENT_CONCEPT,
    NODULE_TYPES,
    RULES,
    SOURCE,
    Assessment,
    NoduleMeasure,
    assess,
    round_diameter,
)


def category_of(nodule_type: str, mm: float, solid_mm: float = 0.0) -> str:
    return assess([NoduleMeasure(nodule_type, mm, solid_mm)]).category


@pytest.mark.parametrize(
    ("mm", "expected"),
    [
        (0.0, "2"), (5.9, "2"), (6.0, "3"),
        (7.9, "3"), (8.0, "4A"),
        (14.9, "4A"), (15.0, "4B"), (80.0, "4B"),
    ],
)
def test_solid_boundaries(mm: float, expected: str) -> None:
    assert category_of("solid", mm) == expected


@pytest.mark.parametrize(
    ("total", "solid", "expected"),
    [
        # total 6 mm separates 2 from 3 while the solid part is small
        (5.9, 2.0, "2"), (6.0, 2.0, "3"),
        (5.9, 0.0, "2"), (6.0, 0.0, "3"),
        # solid component 6 mm separates 3 from 4A
        (12.0, 5.9, "3"), (12.0, 6.0, "4A"),
        # solid component 8 mm separates 4A from 4B
        (12.0, 7.9, "4A"), (12.0, 8.0, "4B"),
        (8.0, 8.0, "4B"), (40.0, 20.0, "4B"),
    ],
)
def test_part_solid_boundaries(total: float, solid: float, expected: str) -> None:
    assert category_of("part-solid", total, solid) == expected


def test_part_solid_with_solid_part_larger_than_nodule_is_sized_by_solid_part() -> None:
    """Inconsistent measurements take the more cautious reading (module docstring)."""
    assert category_of("part-solid", 5.0, 6.5) == "4A"
    assert category_of("part-solid", 5.0, 9.0) == "4B"


@pytest.mark.parametrize(("mm", "expected"), [(0.0, "2"), (29.9, "2"), (30.0, "3"), (60.0, "3")])
def test_ground_glass_boundaries(mm: float, expected: str) -> None:
    assert category_of("ground-glass", mm) == expected


def test_solid_component_is_ignored_outside_part_solid() -> None:
    assert category_of("solid", 5.0, 20.0) == "2"
    assert category_of("ground-glass", 10.0, 20.0) == "2"


@pytest.mark.parametrize(
    ("mm", "rounded"),
    [(5.95, 6.0), (5.94, 5.9), (7.95, 8.0), (14.95, 15.0), (29.95, 30.0), (0.15, 0.2), (6.0, 6.0), (0, 0.0)],
)
def test_round_diameter_half_up(mm: float, rounded: float) -> None:
    assert round_diameter(mm) == rounded


@pytest.mark.parametrize(
    ("nodule", "expected"),
    [
        (NoduleMeasure("solid", 5.95), "3"),
        (NoduleMeasure("solid", 5.94), "2"),
        (NoduleMeasure("solid", 7.95), "4A"),
        (NoduleMeasure("solid", 14.94), "4A"),
        (NoduleMeasure("solid", 14.95), "4B"),
        (NoduleMeasure("part-solid", 5.95, 1.0), "3"),
        (NoduleMeasure("part-solid", 10.0, 5.95), "4A"),
        (NoduleMeasure("part-solid", 10.0, 7.94), "4A"),
        (NoduleMeasure("part-solid", 10.0, 7.95), "4B"),
        (NoduleMeasure("ground-glass", 29.94), "2"),
        (NoduleMeasure("ground-glass", 29.95), "3"),
    ],
)
def test_rounding_applies_before_thresholds(nodule: NoduleMeasure, expected: str) -> None:
    assert assess([nodule]).category == expected


def test_mean_of_axes_landing_on_half_rounds_up() -> None:
    # long 6.0, short 5.9: mean 5.95 mm, reported as 6.0 mm
    assert category_of("solid", (6.0 + 5.9) / 2) == "3"


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_round_diameter_rejects_impossible_sizes(bad: float) -> None:
    with pytest.raises(ValueError):
        round_diameter(bad)


def test_no_nodule_is_category_1() -> None:
    result = assess([])
    assert result == Assessment(
        category="1",
        descriptor="Negative",
        management="Continue annual screening with LDCT in 12 months.",
        reason=result.reason,
        nodule_index=None,
        version="v2022",
    )
    assert "no lung nodule" in result.reason
    assert assess(iter(())).category == "1"


def test_highest_category_wins_and_names_its_nodule() -> None:
    nodules = [
        NoduleMeasure("solid", 4.0),                 # 2
        NoduleMeasure("ground-glass", 31.0),         # 3
        NoduleMeasure("part-solid", 12.0, 6.5),      # 4A
        NoduleMeasure("solid", 7.0),                 # 3
    ]
    result = assess(nodules)
    assert (result.category, result.nodule_index) == ("4A", 2)
    assert result.descriptor == "Suspicious"
    assert result.management.startswith("3-month LDCT")

    result = assess(nodules + [NoduleMeasure("solid", 15.0)])
    assert (result.category, result.nodule_index, result.descriptor) == ("4B", 4, "Very suspicious")


def test_tie_names_the_first_nodule() -> None:
    result = assess([NoduleMeasure("solid", 2.0), NoduleMeasure("solid", 9.0), NoduleMeasure("solid", 14.0)])
    assert (result.category, result.nodule_index) == ("4A", 1)


def test_reason_is_one_sentence_citing_the_rule() -> None:
    result = assess([NoduleMeasure("solid", 8.0)])
    assert result.reason.startswith("solid nodule, mean diameter 8.0 mm: 8 mm <= d < 15 mm at baseline -> 4A")
    assert "solid-4A" in result.reason

    result = assess([NoduleMeasure("part-solid", 9.04, 6.0)])
    assert result.reason.startswith(
        "part-solid nodule, mean diameter 9.0 mm, solid component 6.0 mm: "
        "6 mm <= solid component < 8 mm at baseline -> 4A"
    )
    result = assess([NoduleMeasure("part-solid", 7.0, 3.0)])
    assert "d >= 6 mm and solid component < 6 mm" in result.reason
    for r in (result, assess([]), assess([NoduleMeasure("ground-glass", 30.0)])):
        assert "\n" not in r.reason and r.reason.count(". ") == 0


@dataclass
class Finding:
    """Stands in for inference.findings.Finding: mean_diameter_mm is a property there."""

    type: str
    diameter_mm: float
    short_axis_mm: float
    solid_component_mm: float = 0.0

    @property
    def mean_diameter_mm(self) -> float:
        return (self.diameter_mm + self.short_axis_mm) / 2


def test_duck_typed_findings() -> None:
    result = assess([Finding("solid", 6.0, 5.0), Finding("part-solid", 10.0, 8.0, 8.1)])
    assert (result.category, result.nodule_index) == ("4B", 1)
    assert assess([Finding("solid", 6.0, 5.9)]).category == "3"  # mean 5.95 -> 6.0


def test_unknown_type_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="'calcified'"):
        assess([NoduleMeasure("solid", 4.0), NoduleMeasure("calcified", 4.0)])


def test_missing_attributes_are_rejected() -> None:
    class NoSize:
        type = "solid"

    class PartSolidWithoutComponent:
        type = "part-solid"
        mean_diameter_mm = 7.0

    with pytest.raises(TypeError, match="mean_diameter_mm"):
        assess([NoSize()])
    with pytest.raises(TypeError, match="solid_component_mm"):
        assess([PartSolidWithoutComponent()])


@pytest.mark.parametrize("nodule_type", NODULE_TYPES)
def test_rules_cover_every_size_exactly_once(nodule_type: str) -> None:
    """The table is a partition: each (d, s) on a 0.1 mm grid matches exactly one row."""
    rows = [r for r in RULES if r.nodule_type == nodule_type]
    solids = [0.0]
    if nodule_type == "part-solid":
        solids += [i / 10 for i in range(1, 200, 7)] + [5.9, 6.0, 7.9, 8.0]
    for tenths in range(400):
        d = tenths / 10
        for s in solids:
            assert sum(r.matches(nodule_type, d, s) for r in rows) == 1, (d, s)


def test_every_category_and_rule_is_consistent() -> None:
    assert list(CATEGORIES) == ["1", "2", "3", "4A", "4B"]
    assert [c.rank for c in CATEGORIES.values()] == sorted(c.rank for c in CATEGORIES.values())
    assert {r.nodule_type for r in RULES} == set(NODULE_TYPES)
    assert len({r.id for r in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.category is CATEGORIES[rule.category.category]
        assert rule.descriptor and rule.management.endswith(".")
        assert rule.id.endswith(rule.category.category)


def test_coded_concepts_fit_dicom() -> None:
    """Code Value is SH (16 chars), Code Meaning LO (64 chars) (PS3.5 6.2)."""
    assert CODING_SCHEME_DESIGNATOR.startswith("99")  # private (PS3.3 8.2)
    codes = [c.code for c in CATEGORIES.values()] + [CATEGORY_CONCEPT, MANAGEMENT_CONCEPT]
    assert len({c.value for c in codes}) == len(codes)
    for code in codes:
        assert code.scheme_designator == CODING_SCHEME_DESIGNATOR
        assert len(code.value) <= 16 and len(code.meaning) <= 64
    assert CATEGORIES["4A"].code.value == "LRADS-4A"
    assert assess([NoduleMeasure("solid", 16.0)]).code.value == "LRADS-4B"


def test_source_is_cited() -> None:
    assert "Lung-RADS" in SOURCE and "v2022" in SOURCE and "https://www.acr.org/" in SOURCE
