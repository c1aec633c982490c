"""Held–Suarez (1994) forcing for the dry primitive equations, in sigma coordinates.

Held, I. M. and M. J. Suarez, 1994: A proposal for the intercomparison of the dynamical cores of
atmospheric general circulation models. Bull. Amer. Meteor. Soc., 75, 1825–1830.

- Newtonian relaxation of temperature towards a radiative-equilibrium profile
  ``T_eq(φ, p) = max(200 K, [315 K − ΔT_y sin²φ − Δθ_z log(p/p0) cos²φ] (p/p0)^κ)`` with
  ``ΔT_y = 60 K``, ``Δθ_z = 10 K``, ``p0 = 1000 hPa``, at the rate
  ``k_T = k_a + (k_s − k_a) max(0, (σ − σ_b)/(1 − σ_b)) cos⁴φ``, ``k_a = 1/40 day⁻¹``,
  ``k_s = 1/4 day⁻¹``, ``σ_b = 0.7``;
- Rayleigh friction of the winds in the boundary layer,
  ``k_v = k_f max(0, (σ − σ_b)/(1 − σ_b))``, ``k_f = 1 day⁻¹``. Because ``k_v`` depends on σ only,
  damping the winds is the same as damping vorticity and divergence level by level.

The forcing is an explicit term of the model (``explicit_terms(state) -> tendency``) that
:func:`dinosaur_torch.time_integration.compose_equations` adds to the dynamics.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from dinosaur_torch import coordinate_systems, primitive_equations, scales, time_integration, units

DAY_S = 86400.0
P0_PA = 1.0e5


@dataclasses.dataclass(frozen=True)
class HeldSuarezParams:
    """The constants of Held & Suarez (1994), SI units (rates in 1/s, temperatures in K)."""

    k_f: float = 1.0 / DAY_S
    k_a: float = 1.0 / (40.0 * DAY_S)
    k_s: float = 1.0 / (4.0 * DAY_S)
    sigma_b: float = 0.7
    delta_t_y: float = 60.0
    delta_theta_z: float = 10.0
    t_surface_max: float = 315.0
    t_min: float = 200.0
    p0: float = P0_PA


def equilibrium_temperature(
    lat: np.ndarray | torch.Tensor, p_pa: torch.Tensor, kappa: float, hs: HeldSuarezParams
) -> torch.Tensor:
    """Radiative-equilibrium temperature ``T_eq`` (K) at latitude ``lat`` (radians) and pressure
    ``p_pa`` (Pa); ``lat`` broadcasts against ``p_pa``."""
    lat = torch.as_tensor(lat, dtype=p_pa.dtype, device=p_pa.device)
    sin2, cos2 = torch.sin(lat) ** 2, torch.cos(lat) ** 2
    ratio = p_pa / hs.p0
    t = (hs.t_surface_max - hs.delta_t_y * sin2 - hs.delta_theta_z * torch.log(ratio) * cos2)
    return torch.clamp(t * ratio**kappa, min=hs.t_min)


def boundary_layer_profile(sigma: np.ndarray, sigma_b: float) -> np.ndarray:
    """``max(0, (σ − σ_b)/(1 − σ_b))`` for each sigma level."""
    return np.maximum(0.0, (np.asarray(sigma, dtype=np.float64) - sigma_b) / (1.0 - sigma_b))


class HeldSuarezForcing(nn.Module, time_integration.ExplicitODE):
    """Explicit Held–Suarez tendencies on a :class:`primitive_equations.State` (modal, batched).

    Tensors inside the model are nondimensional (dinosaur's ``SimUnits``: length = Earth radius,
    time = 1/(2Ω), temperature in K); the constants above are converted once here.
    """

    def __init__(
        self,
        coords: coordinate_systems.CoordinateSystem,
        physics_specs: units.SimUnits,
        reference_temperature: np.ndarray,
        params: HeldSuarezParams = HeldSuarezParams(),
    ):
        super().__init__()
        self.coords = coords
        self.physics_specs = physics_specs
        self.params = params
        grid = coords.horizontal
        ref = grid.cos_lat
        dtype, device = ref.dtype, ref.device
        per_second = physics_specs.nondimensionalize(1.0 / scales.units.s)
        sigma = coords.vertical.coordinates.centers.astype(np.float64)
        bl = boundary_layer_profile(sigma, params.sigma_b)  # (L,)
        lat = grid.spec.latitudes  # (nlat,) radians, nodal axis order (lon, lat)
        cos4 = np.cos(lat) ** 4
        k_t = params.k_a + (params.k_s - params.k_a) * bl[:, None, None] * cos4[None, None, :]
        k_v = params.k_f * bl

        def buf(name, arr):
            self.register_buffer(name, torch.as_tensor(np.asarray(arr, np.float64), dtype=dtype,
                                                       device=device), persistent=False)

        buf("k_t", k_t * per_second)  # (L, 1, nlat) nondimensional
        buf("k_v", (k_v * per_second)[:, None, None])  # (L, 1, 1)
        buf("sigma", sigma[:, None, None])  # (L, 1, 1)
        buf("lat", lat[None, None, :])  # (1, 1, nlat)
        buf("t_ref", np.asarray(reference_temperature, np.float64)[:, None, None])
        # exp(log_surface_pressure) is nondimensional pressure; pa_per_unit converts it to Pa
        self.pa_per_unit = float(physics_specs.dimensionalize(1.0, scales.units.pascal).m)

    def surface_pressure_pa(self, log_surface_pressure_modal: torch.Tensor) -> torch.Tensor:
        """Nodal surface pressure in Pa, shape (..., 1, nlon, nlat)."""
        lsp = self.coords.horizontal.to_nodal(log_surface_pressure_modal)
        return torch.exp(lsp) * self.pa_per_unit

    def explicit_terms(self, state: primitive_equations.State) -> primitive_equations.State:
        grid = self.coords.horizontal
        ps = self.surface_pressure_pa(state.log_surface_pressure)  # (..., 1, X, Y)
        p = self.sigma * ps  # (..., L, X, Y)
        t_eq = equilibrium_temperature(self.lat, p, self.physics_specs.kappa, self.params)
        temperature = grid.to_nodal(state.temperature_variation) + self.t_ref
        dt_dt = grid.to_modal(-self.k_t * (temperature - t_eq))
        return primitive_equations.State(
            vorticity=-self.k_v * state.vorticity,
            divergence=-self.k_v * state.divergence,
            temperature_variation=dt_dt,
            log_surface_pressure=torch.zeros_like(state.log_surface_pressure),
            tracers={k: torch.zeros_like(v) for k, v in state.tracers.items()},
            sim_time=None if state.sim_time is None else 1.0,
        )
