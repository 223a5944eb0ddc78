"""Import structures from the Materials Project (optional ``mp-api``): cubic ones of the prior
classes, or general cells of every crystal system (``general``).

One ``materials.summary.search`` per (class, space group), documents returned
as plain dicts (``use_document_model=False``), mapped to
:class:`~crystaloop.db.documents.TrainingStructureDoc` with the MP id as
provenance. Property mapping:

=========================== =====================================
MP summary field            label
=========================== =====================================
formation_energy_per_atom   formation_energy_per_atom (eV/atom)
energy_per_atom             energy_per_atom (eV/atom)
band_gap                    band_gap (eV)
bulk_modulus.vrh / k_vrh    bulk_modulus (GPa)
shear_modulus.vrh / g_vrh   shear_modulus (GPa)
homogeneous_poisson         poisson_ratio
n                           refractive_index
e_total                     dielectric_constant
=========================== =====================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pymatgen.core import Structure

from crystaloop.errors import UserError
from crystaloop.properties import PROPERTIES

DATASET = "materials-project"
GENERAL_DATASET = "materials-project-general"
FIELDS = [
    "material_id",
    "structure",
    "formula_pretty",
    "symmetry",
    "formation_energy_per_atom",
    "energy_per_atom",
    "band_gap",
    "bulk_modulus",
    "shear_modulus",
    "k_vrh",
    "g_vrh",
    "homogeneous_poisson",
    "n",
    "e_total",
]
CUBIC_CLASSES = ("binary", "perovskite", "heusler")
GENERAL_MAX_SITES = 20
GENERAL_MAX_E_HULL = 0.1
"""eV/atom above the Materials Project hull."""
QUERIES: dict[str, list[dict[str, Any]]] = {
    "binary": [{"spacegroup_number": sg, "num_elements": (2, 2), "formula": "AB"} for sg in (221, 225, 216)],
    "perovskite": [{"spacegroup_number": 221, "num_elements": (3, 3), "formula": "ABC3"}],
    "heusler": [{"spacegroup_number": 225, "num_elements": (3, 3), "formula": "ABC2"}],
    "general": [{"num_sites": (1, GENERAL_MAX_SITES), "energy_above_hull": (0.0, GENERAL_MAX_E_HULL)}],
}
"""Summary searches per material class (MP anonymous formulas: AB, ABC3, ABC2). ``general``: any
crystal system, at most 20 sites and within 0.1 eV/atom of the hull (an MP-20-like set), stored
Niggli-reduced as prior-v2 stores its cells, for training the generator on general cells."""
PROTOTYPE_BY_SPACEGROUP = {("binary", 221): "B2", ("binary", 225): "B1", ("binary", 216): "B3",
                           ("perovskite", 221): "perovskite", ("heusler", 225): "L21"}  # fmt: skip


def make_client(api_key: str):
    """An ``mp_api.client.MPRester`` returning dicts.

    Raises
    ------
    UserError
        If ``mp-api`` is not installed.
    """
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise UserError("mp-api is not installed; run `pip install 'crystaloop[mp]'`") from None
    return MPRester(api_key, use_document_model=False, mute_progress_bars=True)


def _modulus(doc: dict, name: str, flat: str) -> float | None:
    value = doc.get(name)
    if isinstance(value, dict):
        value = value.get("vrh")
    if value is None:
        value = doc.get(flat)
    return value


def _in_range(name: str, value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if PROPERTIES[name].contains(value) else None


def labels_from_summary(doc: dict) -> dict[str, float | None]:
    """Property labels (units of :mod:`crystaloop.properties`) from one summary document.

    Values outside a property's physical range (MP's unstable elastic fits) become None.
    """
    raw = {
        "formation_energy_per_atom": doc.get("formation_energy_per_atom"),
        "energy_per_atom": doc.get("energy_per_atom"),
        "band_gap": doc.get("band_gap"),
        "bulk_modulus": _modulus(doc, "bulk_modulus", "k_vrh"),
        "shear_modulus": _modulus(doc, "shear_modulus", "g_vrh"),
        "poisson_ratio": doc.get("homogeneous_poisson"),
        "refractive_index": doc.get("n"),
        "dielectric_constant": doc.get("e_total"),
    }
    return {k: _in_range(k, v) for k, v in raw.items()}


def to_document(doc: dict, material_class: str, spacegroup_number: int | None) -> dict:
    """A TrainingStructureDoc dict for one summary document: the conventional standard cell for
    the cubic classes, the Niggli-reduced cell (dataset ``materials-project-general``) for
    ``general``."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from crystaloop.db.documents import StructureFields, TrainingStructureDoc

    structure = doc["structure"]
    if isinstance(structure, dict):
        structure = Structure.from_dict(structure)
    general = material_class == "general"
    if general:
        cell = structure.get_reduced_structure("niggli")
    else:
        cell = SpacegroupAnalyzer(structure, symprec=0.1).get_conventional_standard_structure()
    fields = StructureFields.fields_from(cell)
    material_id = str(doc["material_id"])
    return TrainingStructureDoc(
        **fields,
        structure_id=material_id,
        source="materials_project",
        dataset=GENERAL_DATASET if general else DATASET,
        material_class="other" if general else material_class,
        prototype=PROTOTYPE_BY_SPACEGROUP.get((material_class, spacegroup_number)),
        labels=labels_from_summary(doc),
        labeller="mp-api",
        converged=True,
        material_id=material_id,
    ).model_dump()


def fetch(
    classes: Sequence[str],
    *,
    api_key: str | None = None,
    max_per_query: int | None = None,
    client_factory: Callable[[str], Any] | None = None,
) -> list[dict]:
    """Summary documents of ``classes`` mapped to TrainingStructureDoc dicts.

    Raises
    ------
    UserError
        Without an API key, with an unknown class, or when the query fails (network, key).
    """
    unknown = sorted(set(classes) - set(QUERIES))
    if unknown:
        raise UserError(f"unknown material class {', '.join(unknown)}; choose from {', '.join(QUERIES)}")
    api_key = api_key or os.environ.get("MP_API_KEY")
    if not api_key:
        raise UserError("MP_API_KEY is not set; get a key at https://materialsproject.org/api and export it")
    try:
        client = (client_factory or make_client)(api_key)
    except UserError:
        raise
    except Exception as exc:  # the client may validate the key or contact the server
        raise UserError(
            f"cannot reach the Materials Project ({type(exc).__name__}); check MP_API_KEY"
        ) from None
    out: dict[str, dict] = {}
    for material_class in classes:
        for query in QUERIES[material_class]:
            for doc in _search(client, query, max_per_query):
                mapped = to_document(doc, material_class, query.get("spacegroup_number"))
                out.setdefault(mapped["structure_id"], mapped)
    return list(out.values())


def _search(client, query: dict, max_per_query: int | None) -> Iterable[dict]:
    kwargs = dict(query, fields=FIELDS)
    if max_per_query:
        kwargs.update(chunk_size=min(max_per_query, 1000), num_chunks=-(-max_per_query // 1000))
    try:
        docs = client.materials.summary.search(**kwargs)
    except UserError:
        raise
    except Exception as exc:  # requests/urllib3/MPRestError all mean "could not query"
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"Materials Project query failed ({type(exc).__name__}: {first}); "
            "check the network and MP_API_KEY"
        ) from None
    docs = [d if isinstance(d, dict) else d.model_dump() for d in docs]
    return docs[:max_per_query] if max_per_query else docs
