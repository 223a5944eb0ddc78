"""Which models a campaign uses: the config's choice, overridden by its finished retrains.

A retrain step is recorded done before the campaign's ``model_versions`` change, so a kill in
between never makes a rerun fine-tune an already fine-tuned model; :func:`adopt_retrained_models`
catches up.
"""

from __future__ import annotations

from dataclasses import dataclass

from crystaloop.db.campaigns import CampaignStore
from crystaloop.loop.config import CampaignConfig


@dataclass(frozen=True)
class CampaignModels:
    """The checkpoints a campaign uses (``paths``) and their registry versions (``versions``), by kind."""

    paths: dict[str, str]
    versions: dict[str, str]


def adopt_retrained_models(
    database, campaigns: CampaignStore, config: CampaignConfig, token: str | None
) -> CampaignModels:
    """Point the campaign at the models of its last finished retrain step, then resolve them."""
    from crystaloop.generative.models.shipped import resolve_models
    from crystaloop.loop.generation import model_versions

    name = config.name
    latest: dict[str, str] | None = None
    for r in campaigns.all_rounds(name):
        step = r.steps.get("retrain")
        if step is not None and step.status == "done" and step.outputs.get("model_versions"):
            latest = dict(step.outputs["model_versions"])
    if latest and latest != dict(campaigns.get(name).model_versions):
        campaigns.update(name, token, model_versions=latest)
    chosen = dict(config.models.model_dump())
    chosen.update(campaigns.get(name).model_versions)
    paths = {k: str(v) for k, v in resolve_models(database, **chosen).items()}
    # Looked up once here, not per step: a step must start without the database answering.
    return CampaignModels(paths, model_versions(database, paths))


def last_retrained_round(campaigns: CampaignStore, name: str, number: int) -> int:
    """The last round before ``number`` whose retrain step ran its hooks, or -1."""
    last = -1
    for r in campaigns.all_rounds(name):
        step = r.steps.get("retrain")
        if r.round < number and step is not None and step.status == "done" and "hooks" in step.outputs:
            last = r.round
    return last
