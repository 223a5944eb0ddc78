"""How well a property model predicts a campaign's own DFT results.

A model's held-out error on the prior data (``crystaloop evaluate properties``) says little
about the candidates a campaign sends to DFT: decoded cells, new compositions. This module
scores a model (any registry version or checkpoint) on the campaign's relaxed candidates,
from their decoded structures, as the model saw them at screening time, against their DFT
values: MAE, bias, the share within 1σ and 2σ, the std factor that would make the errors
unit-normal, and the precision of "predicted in window". ``from_round`` leaves out the rounds
a fine-tuned version was trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def campaign_accuracy(
    database,
    campaign: str,
    *,
    model: str | None = None,
    from_round: int = 0,
    plot: str | None = None,
) -> dict[str, Any]:
    """Errors of ``model`` (default: the registry's default CGCNN) on ``campaign``'s relaxed candidates.

    Rounds are numbered from 0, as stored. Per target property of the campaign: ``n``, ``mae``,
    ``bias`` (mean of predicted minus DFT), ``rmse``, ``within_1sigma``, ``within_2sigma``,
    ``sigma_scale`` (see :func:`crystaloop.loop.acquire.fit_sigma_scale`), and the same MAE of
    the predictions the campaign screened with (``mae_screening``, whatever model each round used).
    ``in_window_precision`` is the share of DFT hits among candidates whose predicted means lie in
    every window.

    Raises
    ------
    UserError
        No such campaign, or no relaxed candidates in the rounds asked for.
    """
    from pymatgen.core import Structure

    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.errors import UserError
    from crystaloop.generative.evaluate import load_cgcnn
    from crystaloop.generative.train.finetune import predict_structures
    from crystaloop.loop.acquire import fit_sigma_scale
    from crystaloop.loop.config import parse_campaign_config

    doc = CampaignStore(database).require(campaign)
    config = parse_campaign_config(doc.config, source=f"campaign {campaign}")
    docs = list(
        database["candidates"]
        .find(
            {"campaign": campaign, "state": "relaxed", "selected_round": {"$gte": from_round}},
            {"_id": 0, "candidate_id": 1, "structure": 1, "predicted": 1, "dft": 1, "selected_round": 1},
        )
        .sort("candidate_id", 1)
    )
    if not docs:
        raise UserError(
            f"campaign {campaign!r} has no relaxed candidates selected in round {from_round} or later; "
            "run more rounds or lower --from-round"
        )
    ensemble, _, path = load_cgcnn(model, database)
    mean, std = predict_structures(ensemble, [Structure.from_dict(d["structure"]) for d in docs])
    properties = list(ensemble.properties)
    targets = [t for t in config.targets if t.property in properties]
    if not targets:
        raise UserError(
            f"the model at {path} predicts none of the campaign's targets "
            f"({', '.join(t.property for t in config.targets)}); pass a CGCNN that does with --model"
        )
    out: dict[str, Any] = {
        "campaign": campaign,
        "model": str(path),
        "from_round": from_round,
        "n_candidates": len(docs),
        "properties": {},
    }
    in_window = np.ones(len(docs), dtype=bool)
    for target in targets:
        k = properties.index(target.property)
        dft = np.array([_value((d.get("dft") or {}).get(target.property)) for d in docs])
        screened = np.array(
            [_value(((d.get("predicted") or {}).get(target.property) or {}).get("mean")) for d in docs]
        )
        ok = np.isfinite(dft) & np.isfinite(mean[:, k])
        error = mean[ok, k] - dft[ok]
        sigma = std[ok, k]
        seen = ok & np.isfinite(screened)
        scale, _ = fit_sigma_scale(list(zip(mean[ok, k], sigma, dft[ok], strict=True)), min_count=1)
        out["properties"][target.property] = {
            "n": int(ok.sum()),
            "mae": _stat(np.abs(error)),
            "bias": _stat(error),
            "rmse": float(np.sqrt(np.mean(error**2))) if error.size else None,
            "within_1sigma": _stat(np.abs(error) <= sigma),
            "within_2sigma": _stat(np.abs(error) <= 2 * sigma),
            "sigma_scale": scale,
            "mae_screening": _stat(np.abs(screened[seen] - dft[seen])),
        }
        lower = -np.inf if target.min is None else target.min
        upper = np.inf if target.max is None else target.max
        in_window &= (mean[:, k] >= lower) & (mean[:, k] <= upper)
    hits = np.array([config.in_all_windows(d.get("dft") or {}) for d in docs])
    out["hits"] = int(hits.sum())
    out["predicted_in_window"] = int(in_window.sum())
    out["in_window_precision"] = float(hits[in_window].mean()) if in_window.any() else None
    if plot:
        from crystaloop.generative.evaluate import parity_plot

        columns = [properties.index(t.property) for t in targets]
        dft = np.array(
            [[_value((d.get("dft") or {}).get(t.property)) for t in targets] for d in docs]
        ).reshape(len(docs), len(targets))
        parity_plot(mean[:, columns], dft, np.isfinite(dft), [t.property for t in targets], plot)
        out["plot"] = plot
    return out


def _value(value) -> float:
    return float("nan") if value is None else float(value)


def _stat(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None
