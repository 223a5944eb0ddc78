"""Shares of a prior-v2 build: by crystal system, by prototype, by decoration kind and by charge balance.

Charge balance is judged two ways, as the field does:

- pymatgen: ``Composition.oxi_state_guesses`` finds at least one assignment of
  ICSD-common oxidation states that sums to zero;
- SMACT: ``smact.screening.smact_validity`` (charge neutrality with the
  Pauling electronegativity test; alloys of metals count as valid).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from functools import cache

from crystaloop.generative.data.decorate import CRYSTAL_SYSTEMS


@cache
def pymatgen_balanced(formula: str) -> bool:
    """Whether pymatgen finds a charge-balanced oxidation-state assignment for ``formula``."""
    from pymatgen.core import Composition

    comp = Composition(formula)
    if len(comp) < 2:
        return False  # an element is neutral, not a compound with balanced charges
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(comp.oxi_state_guesses(max_sites=-50))


@cache
def smact_valid(formula: str) -> bool:
    """SMACT compositional validity of ``formula`` (alloys included, as SMACT's default)."""
    from smact.screening import smact_validity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(smact_validity(formula))


def _share(counter: Counter, total: int) -> dict[str, dict]:
    return {k: {"count": n, "share": n / total if total else 0.0} for k, n in counter.most_common()}


def summarize(records: Iterable[dict]) -> dict:
    """Counts and shares of ``records`` (labels.jsonl lines or shipped prior-v2 records).

    Crystal systems are those of the relaxed structure (the start's for records without one).
    Shares are over labelled records (no reject reason); rejects are counted by reason.
    """
    records = list(records)
    labelled = [r for r in records if not r.get("reject_reason")]
    n = len(labelled)
    systems = Counter(r.get("crystal_system") or r.get("start_crystal_system") for r in labelled)
    changed = sum(
        1 for r in labelled if r.get("crystal_system") and r["crystal_system"] != r.get("start_crystal_system")
    )
    balance = Counter()
    for r in labelled:
        pmg, sm = pymatgen_balanced(r["formula"]), smact_valid(r["formula"])
        balance["pymatgen balanced"] += pmg
        balance["SMACT valid"] += sm
        balance["both"] += pmg and sm
        balance["neither"] += not (pmg or sm)
    by_kind_balance = {
        kind: sum(pymatgen_balanced(r["formula"]) for r in labelled if r.get("kind") == kind)
        for kind in sorted({r.get("kind") for r in labelled})
    }
    return {
        "records": len(records),
        "labelled": n,
        "rejected": len(records) - n,
        "rejects": dict(Counter(_reason(r["reject_reason"]) for r in records if r.get("reject_reason")).most_common()),
        "crystal_system": {s: {"count": systems.get(s, 0), "share": systems.get(s, 0) / n if n else 0.0}
                           for s in CRYSTAL_SYSTEMS},  # fmt: skip
        "crystal_system_changed_by_relaxation": changed,
        "prototype": _share(Counter(r["prototype"] for r in labelled), n),
        "kind": _share(Counter(r.get("kind") for r in labelled), n),
        "pymatgen_balanced_by_kind": by_kind_balance,
        "charge_balance": {k: {"count": balance[k], "share": balance[k] / n if n else 0.0}
                           for k in ("pymatgen balanced", "SMACT valid", "both", "neither")},  # fmt: skip
    }


def _reason(text: str) -> str:
    """A reject reason without its numbers, so that reasons group."""
    return text.split(" by a factor")[0]
