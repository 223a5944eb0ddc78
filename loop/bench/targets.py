"""Every benchmark target, and the papers' figures quoted beside them (one place for both).

The papers' figures are defined in :mod:`crystaloop.generative.paper` (the generative package
quotes them and never imports ``loop``) and re-exported here.
"""

from __future__ import annotations

from crystaloop.generative.paper import (
    ANCHORS,
    PAPER_CANDIDATES_PER_S,
    PAPER_SAMPLING_VALID,
    PAPER_TABLE1_MAE,
    PAPER_TABLE2,
    PAPER_TABLE5,
    QUACC_OVERHEAD,
)

__all__ = [
    "ANCHORS",
    "CAMPAIGN",
    "CLUSTER",
    "DFT_OVERHEAD",
    "GENERATION_PER_S_TO_VALID",
    "PAPER_CANDIDATES_PER_S",
    "PAPER_SAMPLING_VALID",
    "PAPER_TABLE1_MAE",
    "PAPER_TABLE2",
    "PAPER_TABLE5",
    "PRESETS",
    "PROPERTY_MAE",
    "QUACC_OVERHEAD",
    "REALISM_PERCENT",
    "RECONSTRUCTION",
    "ROUNDTRIP",
    "ROUNDTRIP_SPEED_MS",
    "SAMPLING",
    "SUN_ANCHORS",
    "SUN_CAMPAIGN",
    "met",
]

#: ``bench representation``: the voxel round trip (issue 3), as (operator, value).
ROUNDTRIP = {
    "exact_site_count_share": (">=", 0.99),
    "species_accuracy": (">=", 0.995),
    "mean_displacement_angstrom": ("<=", 0.05),
    "lattice_mae_angstrom": ("<=", 0.01),
    "structure_match_share": (">=", 0.99),
}
#: ``bench representation``: median milliseconds per structure at grid 32.
ROUNDTRIP_SPEED_MS = {"voxelize": 5.0, "segment": 20.0}

#: ``evaluate reconstruction``: against :data:`PAPER_TABLE5`.
RECONSTRUCTION = {
    "species_exact": (">=", 0.80),
    "unet_nonzero_recall": (">=", 0.87),
    "lattice_mae_angstrom": ("<=", 0.06),
    "emd_mean_angstrom": ("<=", 0.10),
    "delta_nsites_mean": ("<=", 0.25),
    # the field's measure for general cells (StructureMatcher ltol 0.3, stol 0.5, angle_tol 10);
    # CDVAE reconstructs 45 % of MP-20
    "match_rate": (">=", 0.60),
    "valid_before_repair_share": (">=", 0.90),
    "angle_mae_degrees": ("<=", 1.0),
}
#: ``evaluate properties``: MAE (eV/atom) against :data:`PAPER_TABLE1_MAE`.
PROPERTY_MAE = {"formation_energy_per_atom": 0.06}
#: ``evaluate sampling``: shares per sampling strategy where they differ.
SAMPLING = {
    "valid_before_repair_share": {"random": (">=", 0.90), "around_base": (">=", 0.95)},
    "novel_unique_share_of_valid": (">=", 0.50),
    # general cells (prior-v2): CDVAE 86.7 % SMACT-valid on MP-20; Table 2: 250 of 1,000 around-base
    # samples are novel, so at least a quarter must not decode back to their base
    "smact_valid_share_of_valid": (">=", 0.85),
    "prototype_novel_unique_share_of_valid": (">=", 0.30),
    "base_recovered_share": {"around_base": ("<=", 0.75)},
}

#: ``bench generate``: candidates per second to validity on 2 CPU cores.
GENERATION_PER_S_TO_VALID = 50.0

#: ``bench campaign``: hit-rate ratios of the loop at the target round (counted from 1).
CAMPAIGN = {
    "round": 3,
    "vs_random": 3.0,
    "vs_no_model": 10.0,
}

#: ``bench campaign --target sun``: the loop's S.U.N. hits per 100 oracle calls, pooled over seeds
#: through the target round (counted from 1), at least this many times each other arm's: random
#: structure search (``rss``), prototype substitution and random acquisition (issue 28).
SUN_CAMPAIGN = {
    "round": 5,
    "vs_rss": 5.0,
    "vs_substitution": 2.0,
    "vs_random": 2.0,
}
#: The papers' figures quoted beside the S.U.N. numbers (both also in :data:`ANCHORS`).
SUN_ANCHORS = {
    "gnome": "GNoME: precision of stable predictions from under 6 % to over 80 % through active learning",
    "ftcp": "FTCP: 37.5 % DFT-verified success (6 of 16) against under 1 % by random sampling",
}

#: ``bench cluster``: the scheduling benchmark (issue 30).
CLUSTER = {
    "lost": 0,
    "duplicated": 0,
    "parallel_efficiency_8_workers": 0.8,
    "loop_cpu_ms_per_job": 50.0,
    "harvest_latency_over_poll_s": 2.0,
}

#: ``bench dft``: framework overhead per relaxation (s), and its share of pw.x on the demo cell (%).
DFT_OVERHEAD = {"overhead_s": 0.45, "demo_overhead_percent": 5.0}

#: ``bench presets``: E_f of ``standard`` against the PBE reference and of ``demo`` against
#: ``standard`` (eV/atom), and the lattice constant against experiment (%).
PRESETS = {"standard_vs_reference_ev": 0.10, "demo_vs_standard_ev": 0.05, "lattice_percent": 2.0}

#: ``bench oracle``: corrected formation energies against experiment (eV/atom), and rock-salt NiO
#: (experiment -1.24 eV/atom) within a tolerance as an antiferromagnetic insulator.
ORACLE = {"corrected_mae_ev": 0.10, "nio_experiment_ev": -1.24, "nio_tolerance_ev": 0.15}

#: ``bench realism``: a relaxed volume per atom within this many percent of experiment is a hit.
REALISM_PERCENT = 3.0


def met(value: float, target: tuple[str, float]) -> bool:
    """Whether ``value`` meets an (operator, bound) target such as ``(">=", 0.99)``."""
    op, bound = target
    return value >= bound if op == ">=" else value <= bound
