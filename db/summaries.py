"""Lean per-candidate summaries and per-state counters that queries read.

The full candidate document (structure, provenance, filter trail, history) is
about 2.8 kB. The embedded server decodes every document an index lookup
returns in Python, and it sorts and limits only after that, so queries read a
small summary instead: scalar predictions and DFT values, state, campaign,
round, formula, chemical system and element keys. Summaries live in their own
collection with the candidate id as ``_id``; the full document is then read by
id for the few hits that a query returns.

Counters hold the number of candidates per state for each campaign and round,
so counting never aggregates.
"""

from __future__ import annotations

from datetime import datetime
from itertools import combinations
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from crystaloop.properties import LABEL_NAMES, PROPERTY_NAMES

SUMMARY_COLLECTION = "candidate_summaries"
COUNTER_COLLECTION = "candidate_counts"
META_COLLECTION = "crystaloop_meta"

#: Bumped whenever summaries or indexes change shape; the migration runs when it differs.
#: 3: property keys are fixed-width strings (they were floats).
LAYOUT_VERSION = 3

#: Indexes of the full ``candidates`` collection: the id, which transitions and reads use.
#: Each index entry costs an insert about as much as the document itself on the
#: embedded server, so everything else is looked up through the summaries.
CANDIDATE_INDEXES: tuple[tuple[list[tuple[str, int]], dict[str, Any]], ...] = (
    ([("candidate_id", 1)], {"unique": True}),
)

#: Indexes of the summaries. The embedded planner serves one clause from an index
#: (or equalities on a compound prefix); the store puts the most selective clause
#: first, so every field that should lead a query has an index that starts with it.
SUMMARY_INDEXES: tuple[tuple[list[tuple[str, int]], dict[str, Any]], ...] = (
    ([("campaign", 1), ("state", 1), ("round", 1)], {}),
    ([("reduced_formula", 1)], {}),
    # One entry per element key: leads element queries, and with a campaign serves
    # each created_at slice of a default-sorted element query exactly.
    ([("element_keys", 1), ("campaign", 1), ("created_at", 1)], {}),
    # Leads created_at slices when only campaign, state and round filter.
    ([("created_at", 1)], {}),
    # Every predicted and DFT value in one multikey index (see property_key): the
    # embedded server pays a fixed cost per index on each insert, on top of each entry.
    ([("property_keys", 1)], {}),
)

#: Index names that the layout before summaries created on ``candidates``; the migration drops them.
LEGACY_CANDIDATE_INDEXES = (
    "campaign_1_round_1_state_1",
    "campaign_1_reduced_formula_1",
    "reduced_formula_1",
    "elements_1",
    "chemsys_1",
    *(f"predicted.{name}.mean_1" for name in PROPERTY_NAMES),
    *(f"dft.{name}_1" for name in PROPERTY_NAMES),
)


#: Property values are keyed on one ordered line: property ``i`` owns the keys ``"ii:..."``.
#: The eight learnt properties take 0-7 (predicted) and 8-15 (DFT), as since the first layout;
#: derived properties (the energy above the hull) follow, predicted then DFT, so adding one
#: never moves a stored key.
#: The key of a value is its clamped value, shifted to be non-negative, in units of
#: PROPERTY_KEY_RESOLUTION, written with a fixed number of digits, so that keys sort
#: as the values do.
PROPERTY_KEY_CLAMP = 0.49e6
PROPERTY_KEY_RESOLUTION = 1.0e-4
_PROPERTY_KEY_FORMAT = "%02d:%010d"
_LEARNT_POSITION = {name: i for i, name in enumerate(LABEL_NAMES)}
_DERIVED = [name for name in PROPERTY_NAMES if name not in _LEARNT_POSITION]


def _position(name: str, dft: bool) -> int:
    if name in _LEARNT_POSITION:
        return _LEARNT_POSITION[name] + (len(LABEL_NAMES) if dft else 0)
    return 2 * len(LABEL_NAMES) + 2 * _DERIVED.index(name) + int(dft)


def property_key(name: str, value: float, *, dft: bool = False) -> str:
    """The index key of one property value (units per property), e.g. ``"02:4900012344"``.

    The mapping is monotone (values closer than the resolution, or beyond the
    clamp, share a key), so a window ``[lo, hi]`` on the values is contained in
    ``[key(lo), key(hi)]``; the exact window is checked on each fetched summary.
    A string rather than a number: the embedded server encodes a string index
    key about three times faster than a number, and a summary writes 8 to 16 of them.
    """
    position = _position(name, dft)
    clamped = min(max(value, -PROPERTY_KEY_CLAMP), PROPERTY_KEY_CLAMP)
    # Floor division of the shifted (non-negative) value: monotone, and an integral float.
    return _PROPERTY_KEY_FORMAT % (position, (clamped + PROPERTY_KEY_CLAMP) // PROPERTY_KEY_RESOLUTION)


def property_key_range(name: str, bounds: dict[str, float], *, dft: bool = False) -> dict[str, str]:
    """Key bounds that contain every value within ``bounds`` (``$gte``/``$gt``/``$lte``/``$lt``)."""
    lo = bounds.get("$gte", bounds.get("$gt"))
    hi = bounds.get("$lte", bounds.get("$lt"))
    return {
        "$gte": property_key(name, -PROPERTY_KEY_CLAMP if lo is None else lo, dft=dft),
        "$lte": property_key(name, PROPERTY_KEY_CLAMP if hi is None else hi, dft=dft),
    }


def element_keys(elements: list[str]) -> list[str]:
    """Each pair ``"A-B"`` of the (sorted) elements; the element itself for a unary compound.

    A pair is the exact index key of ``$all`` of two elements. Single elements
    are not keyed: one element matches too many candidates for an index to
    help, and every key costs each insert an index entry.
    """
    symbols = sorted(set(elements))
    if len(symbols) == 1:
        return symbols
    return [f"{a}-{b}" for a, b in combinations(symbols, 2)]


def element_key(elements: list[str]) -> str:
    """The :func:`element_keys` entry of every candidate with all of ``elements`` (two or more),
    or of the unary compound of one element."""
    symbols = sorted(set(elements))
    return "-".join(symbols[:2])


class CandidateSummaryDoc(BaseModel):
    """The query view of one candidate (collection ``candidate_summaries``).

    Derived from the full document only; the migration and ``crystaloop db
    migrate --rebuild`` recompute it.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    candidate_id: str = Field(alias="_id")
    campaign: str
    round: int
    state: str
    reduced_formula: str
    chemsys: str
    elements: list[str]
    element_keys: list[str] = Field(description="Elements and element pairs 'A-B' (multikey index).")
    nsites: int
    acquisition_score: float | None = None
    predicted: dict[str, float | None] = Field(
        default_factory=dict, description="Predicted mean per property (units per property)."
    )
    dft: dict[str, float | None] = Field(
        default_factory=dict, description="DFT value per property; absent keys stay absent."
    )
    property_keys: list[str] = Field(
        default_factory=list, description="property_key of each predicted and DFT value (multikey index)."
    )
    created_at: datetime
    revision: int = Field(
        description="Length of the state history; a summary is never replaced by an older one."
    )

    @classmethod
    def document_from(cls, candidate: dict[str, Any]) -> dict[str, Any]:
        """The summary of a full candidate document (as stored), ready to write.

        Built as a plain dict when every value already has its type (the source
        is a validated ``CandidateDoc`` or its stored form); anything else, such
        as an integer or a string where a float belongs, goes through the model,
        which coerces or rejects it.
        """
        predicted = {
            name: value.get("mean") if isinstance(value, dict) else value
            for name, value in (candidate.get("predicted") or {}).items()
        }
        dft = dict(candidate.get("dft") or {})
        summary = {
            "_id": candidate["candidate_id"],
            "campaign": candidate["campaign"],
            "round": candidate["round"],
            "state": str(candidate.get("state", "generated")),
            "reduced_formula": candidate["reduced_formula"],
            "chemsys": candidate["chemsys"],
            "elements": list(candidate["elements"]),
            "element_keys": element_keys(candidate["elements"]),
            "nsites": candidate["nsites"],
            "acquisition_score": candidate.get("acquisition_score"),
            "predicted": predicted,
            "dft": dft,
            "property_keys": [
                property_key(name, value, dft=is_dft)
                for is_dft, values in ((False, predicted), (True, dft))
                for name, value in values.items()
                if isinstance(value, int | float) and value == value and name in PROPERTY_NAMES
            ],
            "created_at": candidate["created_at"],
            "revision": len(candidate.get("state_history") or ()),
        }
        typed = (
            type(summary["round"]) is int
            and type(summary["nsites"]) is int
            and isinstance(summary["created_at"], datetime)
            and all(
                type(v) is float or v is None for v in (summary["acquisition_score"], *predicted.values())
            )
            and all(type(v) is float or v is None for v in dft.values())
        )
        if typed:
            return summary
        return cls.model_validate(summary).model_dump(by_alias=True)


#: Fields of the full document that :meth:`CandidateSummaryDoc.document_from` reads.
SUMMARY_SOURCE_FIELDS = {
    "_id": 0,
    "candidate_id": 1,
    "campaign": 1,
    "round": 1,
    "state": 1,
    "reduced_formula": 1,
    "chemsys": 1,
    "elements": 1,
    "nsites": 1,
    "acquisition_score": 1,
    "predicted": 1,
    "dft": 1,
    "created_at": 1,
    "state_history.state": 1,
}


def counter_id(campaign: str, round: int) -> str:
    """The ``_id`` of the counter document of one campaign round (the round has no ':')."""
    return f"{round}:{campaign}"


def counter_document(
    campaign: str, round: int, counts: dict[str, int], first_created_at: Any, last_created_at: Any
) -> dict[str, Any]:
    """A campaign round's counter with absolute counts per state and its created_at span."""
    return {
        "_id": counter_id(campaign, round),
        "campaign": campaign,
        "round": round,
        "counts": counts,
        "first_created_at": first_created_at,
        "last_created_at": last_created_at,
    }
