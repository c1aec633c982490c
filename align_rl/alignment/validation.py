"""Validation of a policy during Diffusion-DPO: does it draw better analyses than the reference?

Every ``dpo.val_every`` learner steps the policy draws ``dpo.val_members`` candidates for each of
``dpo.val_backgrounds`` backgrounds of the ``data.val`` split (never used for pairs or tests), with
the same guidance, sampler and noise as the reference's candidates of the same backgrounds (common
random numbers: the comparison sees the models, not the draws). The policy's and the reference's
candidates of one background are pooled and scored together with the run's rewards; the ranking
reward of the variant (the normalised composite for ``-M``, the Geo-Score for ``-P``) is computed
over the pool, and the validation reward is the mean over backgrounds of

    gain = mean(policy candidates' r) − mean(reference candidates' r)

(> 0: the policy's analyses rank higher). The learner keeps the checkpoint of the best gain
(``docs/method.md`` §9). Raw metrics are logged beside it: ``val/mse`` of the policy's analyses
(normalised, all 69 channels) against ``val/mse_ref``, and the Geo-Scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from align_rl.alignment.candidates import BackgroundTask, Drawn, draw_candidates, forecast_from
from align_rl.alignment.rewards import RewardContext, composite, score_all
from align_rl.models.forecaster import first_frames


def ranking_weights(variant: str, weights: Mapping[str, float]) -> dict[str, float]:
    """The reward weights a variant ranks by: ``-P`` the Geo-Score alone, ``-M`` the run's."""
    return {"phys": 1.0} if variant == "P" else {k: float(v) for k, v in weights.items()}


@dataclass
class _Ref:
    drawn: Drawn
    forecasts: torch.Tensor | None


class Validator:
    """Scores a policy ε_θ against the reference on fixed validation backgrounds.

    ``codec``, ``forecaster``: the run's models (normalised fields); ``tasks``: the validation
    backgrounds; ``cfg``: the run's :class:`~align_rl.config.Config` (``sampler``, ``guidance``,
    ``obs``, ``rewards``, ``pairs.guidance``); ``weights``: the ranking weights
    (:func:`ranking_weights`); ``members``: candidates per background and model.
    """

    def __init__(self, codec: Any, forecaster: Any, reference: Any, normalizer: Any,
                 lat: np.ndarray, lon: np.ndarray, tasks: Sequence[BackgroundTask], cfg: Any,
                 weights: Mapping[str, float], members: int, seed: int = 0) -> None:
        self.codec, self.forecaster, self.normalizer = codec, forecaster, normalizer
        self.lat, self.lon, self.tasks, self.cfg = lat, lon, list(tasks), cfg
        self.weights = dict(weights)
        self.members, self.seed = int(members), int(seed)
        self.ref = [self._draw(reference, t) for t in self.tasks]

    def _draw(self, eps_model: Any, task: BackgroundTask) -> _Ref:
        c = self.cfg
        was = getattr(eps_model, "training", False)
        eps_model.eval()
        try:
            # version 0 for every model: the same observations and sampler noise (paired draws)
            (d,) = draw_candidates(self.codec, eps_model, [task], 0, c.pairs.guidance, c.sampler,
                                   c.guidance, c.obs, self.members, self.seed)
        finally:
            eps_model.train(was)
        fc = None
        if "forecast" in c.rewards.names:
            x = torch.from_numpy(d.fields)
            prev = first_frames(torch.from_numpy(task.x_prev), torch.from_numpy(task.x_b), x)
            fc = forecast_from(self.forecaster, prev, x, int(c.rewards.forecast_hours))
        return _Ref(d, fc)

    def score(self, policy: Any) -> dict[str, float]:
        """``val/reward_gain`` (mean over backgrounds of the pooled ranking reward's policy-minus-
        reference mean), ``val/mse``, ``val/mse_ref`` (normalised), ``val/geo``, ``val/geo_ref``."""
        c = self.cfg
        gains, mse_p, mse_r, geo_p, geo_r = [], [], [], [], []
        n = self.members
        for task, ref in zip(self.tasks, self.ref):
            pol = self._draw(policy, task)
            fields = torch.from_numpy(np.concatenate([pol.drawn.fields, ref.drawn.fields]))
            fc = None if pol.forecasts is None else torch.cat([pol.forecasts, ref.forecasts])
            truth = torch.from_numpy(task.truth)
            ctx = RewardContext(fields, truth, self.normalizer, self.lat, self.lon, fc,
                                None if fc is None else torch.from_numpy(task.truth_fc),
                                int(c.rewards.geo_level), float(c.rewards.geo_equator_band))
            sc = score_all(ctx, list(c.rewards.names))
            r = composite(sc, self.weights, c.rewards.normalize)
            gains.append(float(r[:n].mean() - r[n:].mean()))
            se = ((fields.double() - truth.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
            mse_p.append(se[:n].mean()); mse_r.append(se[n:].mean())
            if "phys" in sc:
                geo_p.append(100 * sc["phys"][:n].mean()); geo_r.append(100 * sc["phys"][n:].mean())
        out = {"val/reward_gain": float(np.mean(gains)), "val/mse": float(np.mean(mse_p)),
               "val/mse_ref": float(np.mean(mse_r))}
        if geo_p:
            out.update({"val/geo": float(np.mean(geo_p)), "val/geo_ref": float(np.mean(geo_r))})
        return out
