"""Quality control of point observations (docs/method.md §3.1), in normalised units.

- :func:`background_check`: reject ``|y − H(x_b)| > k · sqrt(σ_o² + σ_b²)`` (the classical first-
  guess check; ``σ_b`` the background error at the observation).
- :func:`reference_filter`: the paper's filter for its GDAS experiment (its Table 5): drop
  observations that deviate from a reference state (ERA5 there, the truth here) by more than
  ``k`` "standard errors", ``|y − H(x_ref)| > k · s``. The paper does not define the standard
  error; ``scale="climate"`` (default) takes ``s`` as the channel's standard deviation (the
  normaliser's, i.e. 1 in normalised units: the paper's k = 0.1 then keeps observations within a
  tenth of the climatological spread), ``scale="obs_error"`` takes ``s = σ_o``.

Each returns the kept :class:`PointObservations` and a :class:`QCReport` counting checked and
rejected observations per variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from align_rl.errors import ConfigError, InputError
from align_rl.observations.operator import STATE_VARS, PointObservations


@dataclass
class QCReport:
    """Counts per state variable (``t``, ``t2m`` …) of one check."""

    check: str
    checked: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def total_rejected(self) -> int:
        return int(sum(self.rejected.values()))

    def lines(self) -> list[str]:
        """One line per variable: ``name: rejected / checked``."""
        return [f"{self.check} {v}: rejected {self.rejected.get(v, 0)} of {n}"
                for v, n in sorted(self.checked.items())]

    def as_dict(self) -> dict:
        return {"check": self.check, "checked": dict(self.checked), "rejected": dict(self.rejected)}


def _report(name: str, obs: PointObservations, reject: torch.Tensor) -> QCReport:
    code = obs.var_code.cpu().numpy()
    rej = reject.cpu().numpy()
    rep = QCReport(name)
    for c in np.unique(code):
        v = STATE_VARS[int(c)]
        rep.checked[v] = int((code == c).sum())
        rep.rejected[v] = int(((code == c) & rej).sum())
    return rep


def _at_obs(obs: PointObservations, sigma_b) -> torch.Tensor:
    """σ_b at each observation, normalised: a number, (n,) per observation, or (69,) per channel
    (weighted by the operator's |weights|)."""
    if np.isscalar(sigma_b):
        return torch.full((obs.n_obs,), float(sigma_b), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(sigma_b, dtype=np.float64))
    if s.shape == (obs.n_obs,):
        return s
    if s.shape == (obs.field_shape[0],):
        ch = torch.div(obs.index.cpu(), obs.field_size // obs.field_shape[0], rounding_mode="floor")
        return (obs.weight.cpu().double().abs() * s[ch]).sum(1)
    raise InputError(f"sigma_b has shape {tuple(s.shape)}; give a number, one value per "
                     f"observation ({obs.n_obs}) or one per channel ({obs.field_shape[0]})")


def background_check(obs: PointObservations, x_b: torch.Tensor, k: float = 5.0, sigma_b=1.0
                     ) -> tuple[PointObservations, QCReport]:
    """Keep ``|ỹ − H̃(x_b)| <= k sqrt(σ̃_o² + σ̃_b²)``; ``x_b`` (B, 69, H, W) normalised, ``sigma_b``
    normalised (see :func:`_at_obs`)."""
    if not k > 0:
        raise ConfigError(f"background check k={k} must be > 0")
    d = obs.residual(x_b.to(obs.values.device)).detach().double().cpu()
    sb = _at_obs(obs, sigma_b)
    reject = d.abs() > k * torch.sqrt(obs.variance.double().cpu() + sb.square())
    return obs.subset(~reject), _report("background", obs, reject)


def reference_filter(obs: PointObservations, x_ref: torch.Tensor, k: float = 0.1,
                     scale: str = "climate") -> tuple[PointObservations, QCReport]:
    """The paper's filter: keep ``|ỹ − H̃(x_ref)| <= k · s`` (``scale``: climate | obs_error)."""
    if not k > 0:
        raise ConfigError(f"reference filter k={k} must be > 0")
    if scale not in ("climate", "obs_error"):
        raise ConfigError(f"reference filter scale {scale!r} is not one of climate, obs_error")
    d = obs.residual(x_ref.to(obs.values.device)).detach().double().cpu()
    s = torch.ones_like(d) if scale == "climate" else obs.variance.double().cpu().sqrt()
    reject = d.abs() > k * s
    return obs.subset(~reject), _report("reference", obs, reject)
