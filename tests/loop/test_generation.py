"""End-to-end generation with the shipped models against the real embedded database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crystaloop.db.documents import CandidateDoc
from crystaloop.errors import UserError
from crystaloop.generative import sample
from crystaloop.generative.models.shipped import resolve_models
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.generation import (
    BaseCompound,
    GenerationReport,
    allowed_elements,
    draw_latents,
    encode_bases,
    generate_candidates,
    load_decoder,
    pseudo_family,
    resolve_base,
)

FAKE_FAMILY = Path(__file__).resolve().parents[1] / "dft" / "data" / "family.yaml"


def campaign(**overrides) -> dict:
    data = {
        "name": "gen-test",
        "targets": [{"property": "formation_energy_per_atom", "min": -10.0, "max": 5.0}],
        "sampling": {"mode": "around_base", "base_formulas": ["NaCl"], "std": 0.5, "seed": 3},
        "filters": {"uip_screen": False, "same_stoichiometry_as_base": False},
        "dft": {"engine": "surrogate"},
    }
    data.update(overrides)
    return data


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def counts(report: GenerationReport) -> list[tuple[str, int, int]]:
    return [(s.stage, s.n_in, s.n_out) for s in report.stages]


def test_generate_writes_shortlisted_candidates_and_resumes_safely(database):
    config = parse_campaign_config(campaign())
    dry = generate_candidates(config, database=database, n=16, round=2, seed=11, dry_run=True)
    assert database["candidates"].count_documents({}) == 0  # a dry run writes nothing

    report = generate_candidates(config, database=database, n=16, round=2, seed=11, generation_id="g-1")
    assert counts(report) == counts(dry)  # determinism with a seed
    assert report.rejected_reasons == dry.rejected_reasons
    stages = [s.stage for s in report.stages]
    assert stages == ["decoded", "valid", "elements", "novel", "window", "unique"]
    assert report.stages[0].n_in == 16
    for before, after in zip(report.stages, report.stages[1:], strict=False):
        assert before.n_out == after.n_in
    assert report.n_shortlisted == report.stages[-1].n_out > 0
    assert set(report.model_versions) == {"vae", "unet", "cgcnn"}
    json.dumps(report.model_dump(mode="json"))

    stored = [CandidateDoc.model_validate(d) for d in database["candidates"].find({}, {"_id": 0})]
    assert sorted(d.candidate_id for d in stored) == sorted(report.shortlisted)
    ensemble_properties = None
    for doc in stored:
        assert doc.state == "shortlisted" and doc.campaign == "gen-test" and doc.round == 2
        assert doc.provenance["generation_id"] == "g-1"
        assert doc.provenance["strategy"] == "around_base" and doc.provenance["seed"] == 11
        assert doc.provenance["parameters"]["std"] == 0.5
        assert doc.provenance["sample"]["base_formula"] == "NaCl"
        assert doc.provenance["model_versions"] == report.model_versions
        assert [s.stage for s in doc.filter_trail] == stages and all(s.passed for s in doc.filter_trail)
        ensemble_properties = ensemble_properties or set(doc.predicted)
        assert set(doc.predicted) == ensemble_properties
        assert "formation_energy_per_atom" in doc.predicted
        ef = doc.predicted["formation_energy_per_atom"]
        assert ef.std is not None and ef.model_version == report.model_versions["cgcnn"]
        assert [h["state"] for h in doc.state_history] == ["generated", "shortlisted"]
        assert "latent" not in doc.provenance

    # The same draw again: every survivor is now a campaign candidate, so novelty rejects it; with
    # store_rejects the rejects are written compactly with their stage.
    config = parse_campaign_config(
        campaign(filters={"uip_screen": False, "same_stoichiometry_as_base": False, "store_rejects": True})
    )
    repeat = generate_candidates(config, database=database, n=16, round=3, seed=11, generation_id="g-2")
    assert repeat.n_shortlisted == 0
    novel = next(s for s in repeat.stages if s.stage == "novel")
    assert novel.n_in - novel.n_out >= report.n_shortlisted
    rejected = list(database["candidates"].find({"provenance.generation_id": "g-2"}))
    assert len(rejected) == repeat.n_rejects_stored > 0
    assert all(d["state"] == "rejected" and d["rejected_stage"] for d in rejected)
    assert {d["rejected_stage"] for d in rejected} >= {"novel"}


def test_pseudopotential_coverage_restricts_the_decoded_elements(settings, monkeypatch):
    config = parse_campaign_config(campaign(dft={"engine": "espresso", "pseudo_family": str(FAKE_FAMILY)}))
    family = pseudo_family(config)
    assert family.name == "fake-pbe"
    assert allowed_elements(config, family, ["Na", "Cl", "Si", "C", "Cu", "Fe"]) == ["Si", "C", "Cu"]
    denied = parse_campaign_config(campaign(elements={"deny": ["Cu"]}))
    assert pseudo_family(denied) is None  # the surrogate needs no pseudopotentials
    assert allowed_elements(denied, None, ["Na", "Cu"]) == ["Na"]
    with pytest.raises(UserError, match="no element the decoder knows is allowed"):
        allowed_elements(config, family, ["Na", "Cl"])
    named = parse_campaign_config(campaign(dft={"engine": "espresso", "pseudo_family": "sssp-efficiency"}))
    monkeypatch.setenv("CRYSTALOOP_PSEUDO_FAMILY", str(FAKE_FAMILY))
    from crystaloop.settings import get_settings

    get_settings.cache_clear()
    with pytest.raises(UserError, match="asks for pseudopotential family 'sssp-efficiency'"):
        pseudo_family(named)


def test_base_compounds_come_from_the_training_data_or_a_cif(database, tmp_path):
    base = resolve_base(database, "NaCl")
    assert base.structure.composition.reduced_formula == "NaCl" and base.formation_energy < -1.5
    cif = tmp_path / "nacl.cif"
    base.structure.to(filename=str(cif))
    assert resolve_base(database, str(cif)).formula == "NaCl"
    with pytest.raises(UserError, match="not in the training data"):
        resolve_base(database, "Xe3Kr")


def test_a_cif_base_passes_the_config_and_hits_take_their_share_of_the_samples(database, tmp_path):
    nacl = resolve_base(database, "NaCl")
    cif = tmp_path / "hit.cif"
    nacl.structure.to(filename=str(cif))
    config = parse_campaign_config(
        campaign(
            sampling={
                "mode": "around_base",
                "base_formulas": [str(cif)],
                "around_hits": 0.25,
                "hits_std": 0.3,
            }
        )
    )
    hit = BaseCompound("NaCl", nacl.structure, -1.9)
    paths = resolve_models(database)
    decoder = load_decoder(str(paths["vae"]), str(paths["unet"]), "cpu")
    samples, bases = draw_latents(config, decoder, database, n=40, strategy="around_base", seed=5, hits=[hit])
    assert [b.formula for b in bases] == ["NaCl"] and len(samples) == 40
    around = [r for r in samples.rows if r.get("around_hit")]
    assert len(around) == 10 and all(r["base_formula"] == "NaCl" for r in around)
    assert samples.rows[:30] == [r for r in samples.rows if not r.get("around_hit")]
    assert samples.parameters["around_hits"] == 10 and samples.parameters["hits"] == ["NaCl"]
    # conditioned on the target window's deciles, scattered around the hit's encoding with hits_std
    window = set(sample.window_deciles(decoder.vae.condition, -10.0, 5.0))
    assert {r["decile"] for r in around} <= window
    mu = encode_bases(decoder, [hit])[0]
    spread = (samples.z[30:] - mu).std().item()
    assert 0.2 < spread < 0.4
    # without hits (round 1) every sample follows the strategy
    plain, _ = draw_latents(config, decoder, database, n=40, strategy="around_base", seed=5)
    assert len(plain) == 40 and not any(r.get("around_hit") for r in plain.rows)


def test_generate_cli_dry_run_json_and_bad_input(settings, tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign()))
    exe = Path(sys.executable).parent / "crystaloop"
    result = subprocess.run(
        [
            str(exe),
            "generate",
            "--config",
            str(path),
            "--n",
            "6",
            "--dry-run",
            "--format",
            "json",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_requested"] == 6 and report["dry_run"] is True
    assert report["stages"][0]["stage"] == "decoded" and report["stages"][0]["n_in"] == 6
    bad = subprocess.run(
        [str(exe), "generate", "--config", str(path), "--strategy", "sideways"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "unknown strategy 'sideways'" in bad.stderr and "Traceback" not in bad.stderr


def test_novelty_scope_own_leaves_out_other_campaigns_results(database):
    from pymatgen.core import Lattice, Structure

    from crystaloop.db.documents import StructureFields, TrainingStructureDoc
    from crystaloop.db.training import upsert_documents
    from crystaloop.loop.generation import known_structures

    rock_salt = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    b2 = Structure(Lattice.cubic(3.4), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    zinc_blende = Structure.from_spacegroup(
        "F-43m", Lattice.cubic(6.0), ["Na", "Cl"], [[0, 0, 0], [0.25, 0.25, 0.25]]
    )
    docs = [
        ("prior:B1:Na-Cl", "prior", "prior-v1", rock_salt),
        ("surrogate:other:c1", "surrogate", "campaign:other", b2),
        ("surrogate:mine:c1", "surrogate", "campaign:mine", zinc_blende),
    ]
    upsert_documents(
        database,
        [
            TrainingStructureDoc(
                structure_id=sid, source=source, dataset=dataset, **StructureFields.fields_from(s)
            ).model_dump()
            for sid, source, dataset, s in docs
        ],
    )

    def groups(scope: str) -> list[int]:
        return sorted(
            s.get_space_group_info()[1] for s in known_structures(database, "mine", scope=scope)("NaCl")
        )

    assert groups("all") == [216, 221, 225]
    assert groups("own") == [216, 225]  # the other campaign's B2 result is not known to this one


def test_sampling_symprec_symmetrises_what_the_campaign_shortlists(database):
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    config = parse_campaign_config(campaign(sampling={"mode": "random", "seed": 3, "symprec": 0.3}))
    report = generate_candidates(config, database=database, n=16, round=1, seed=7, generation_id="sym")
    assert report.n_shortlisted > 0
    for doc in database["candidates"].find({"provenance.generation_id": "sym"}):
        structure = Structure.from_dict(doc["structure"])
        # exact symmetry: a tight tolerance finds what the loose one found
        tight = SpacegroupAnalyzer(structure, symprec=1e-3).get_space_group_symbol()
        assert tight == SpacegroupAnalyzer(structure, symprec=0.3).get_space_group_symbol()
    from crystaloop.errors import ConfigError

    for bad in (0, 2.0):
        with pytest.raises(ConfigError) as info:
            parse_campaign_config(campaign(sampling={"mode": "random", "symprec": bad}))
        assert any("symprec" in line for line in info.value.lines)
