"""Before a campaign's first step: first-run set-up, and the checks that refuse a campaign
that cannot work (DFT trust, element references, the execution backend)."""

from __future__ import annotations

from collections.abc import Callable

from crystaloop.dft.engines import get_engine
from crystaloop.errors import UserError
from crystaloop.loop.config import CampaignConfig


def prepare(database, config: CampaignConfig, log: Callable[[str], None]) -> None:
    """First run on a fresh install: load the shipped prior data, build the local PBE family.

    Both are what ``crystaloop data load-prior`` and ``crystaloop dft pseudos build-local`` do;
    they run only when missing, so a campaign needs no other set-up command.
    """
    from crystaloop.db.training import has_source, replace_dataset

    if not has_source(database, "prior"):
        from crystaloop.generative.data import prior

        log("loading the shipped prior training data (first run)")
        doc = prior.read_prior(prior.SHIPPED_PATH)
        replace_dataset(database, doc["dataset"], prior.to_documents(doc))
    if get_engine(config.dft.engine).dft:
        from crystaloop.settings import get_settings

        settings = get_settings()
        if not settings.pseudo_family and not settings.resolved_pseudo_family().is_file():
            from crystaloop.dft.pseudos import build_local_family

            log(f"building the local PBE family in {settings.resolved_pseudo_dir()} (first run)")
            build_local_family(settings.resolved_pseudo_dir())


def check_dft(config: CampaignConfig) -> list[str]:
    """Check what must hold before any work: element references and DFT trust.

    Returns
    -------
    list of str
        Warnings, one line each (e.g. cutoffs below the family's suggestion).

    Raises
    ------
    UserError
        An allowed element without a reference structure, or refused by the verification.
    """
    engine = get_engine(config.dft.engine)
    # an unknown or invalid preset is one line now, not at submit
    engine.check(config.dft.preset, pw_command=config.dft.pw_command, pw_command_setting="dft.pw_command")
    elements = [e for e in (config.elements.allow or []) if e not in set(config.elements.deny)]
    if not elements:
        return []
    from crystaloop.dft.references import check_references

    check_references(elements, supplied=config.dft.reference_structures)
    if not engine.dft:
        return []
    from crystaloop.dft.verification import campaign_dft_problems

    warnings, refusals = campaign_dft_problems(
        elements,
        preset=config.dft.preset,
        allow_unverified=config.dft.allow_unverified,
        override_hint="dft.allow_unverified: true in the campaign file",
    )
    if refusals:
        raise UserError(refusals[0], refusals[1:])
    return warnings


def check_execution(config: CampaignConfig) -> None:
    """Refuse an execution backend that cannot work as configured.

    Raises
    ------
    UserError
        A remote backend (FireWorks, jobflow-remote) with no MongoDB URI: the embedded
        server serves this workstation only, and its workers could not deliver results.
    """
    from crystaloop.settings import get_settings

    backend = config.execution.backend
    if backend != "local" and not get_settings().mongodb_uri:
        raise UserError(
            f"execution.backend {backend} needs a MongoDB its workers and runner can reach; set "
            "CRYSTALOOP_MONGODB_URI (the embedded server serves this workstation only) or use backend local"
        )
