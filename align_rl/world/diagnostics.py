"""From the model's spectral sigma-level state to the 69 channels on a target lat/lon grid.

Steps, per member and output time:
1. **Horizontal**: the spectral fields are evaluated exactly at the target grid's cell centres
   (:class:`SpectralEvaluator`: real Fourier basis in longitude × associated Legendre functions
   at ``sin(lat)``), so any grid of the WeatherBench family works, coarser or finer than T21.
   Winds come from vorticity/divergence via ``u cos φ``, ``v cos φ`` (no pole is a cell centre).
2. **Vertical** (:func:`sigma_to_pressure`): linear in ``log p`` between sigma levels
   (dinosaur-torch's ``vertical_interpolation.interp``). Geopotential ``Φ = Φ_s + Σ G T`` (Durran's
   hydrostatic weights; ``Φ_s = 0``, Held–Suarez has no orography) is interpolated on the sigma
   levels plus the surface (σ = 1, Φ = Φ_s). Below the lowest model level (σ_L) temperature follows
   the standard lapse rate ``γ = 6.5 K/km``: ``T(p) = T_L (p / p_L)^(Rγ/g)``; below the surface
   (p > p_s) ``Φ(p) = Φ_s + (g T_s / γ)(1 − (p/p_s)^(Rγ/g))`` with ``T_s = T_L (p_s/p_L)^(Rγ/g)``;
   winds are held at their lowest-level values.
3. **Derived channels** (labelled ``derived`` in the store):
   ``q = RH · q_sat(T, p)`` with a fixed relative humidity ``RH`` (Bolton 1980 saturation vapour
   pressure over water); ``msl = p_s exp(Φ_s / (R T̄))``, ``T̄ = T_s + γ Φ_s / (2 g)`` (hypsometric
   reduction; ``= p_s`` for Φ_s = 0); ``t2m = T_L (p_s / p_L)^κ`` (dry adiabat through the surface
   layer); ``u10, v10 = (u, v)_L · ln(10 m / z0) / ln(z_L / z0)`` (neutral log law, ``z0 = 0.1 m``,
   ``z_L = R T_L ln(p_s/p_L) / g``).
Units: SI (m/s, K, Pa, m²/s², kg/kg). Output ``(M, 69, H, W)`` float32, latitude ascending.
"""

from __future__ import annotations

import numpy as np
import torch

from dinosaur_torch import associated_legendre, primitive_equations, scales, vertical_interpolation

from align_rl.io.grid import Grid
from align_rl.io.schema import LEVELS, N_CHANNELS, channels_of
from align_rl.world.dycore import Dycore

G_SI = 9.80616  # m s-2 (dinosaur-torch's constant)
R_SI = 1004.0 * 2.0 / 7.0  # J kg-1 K-1 (dinosaur-torch: Cp · κ)
KAPPA = 2.0 / 7.0
LAPSE_RATE = 6.5e-3  # K m-1
ALPHA = R_SI * LAPSE_RATE / G_SI
EPSILON = 0.622  # R_dry / R_vapour
RELATIVE_HUMIDITY = 0.7  # (choice) fixed relative humidity for the diagnosed q
ROUGHNESS_M = 0.1
DERIVED = ("q", "msl", "u10", "v10", "t2m")


def saturation_vapour_pressure(t_k: torch.Tensor) -> torch.Tensor:
    """Bolton (1980) saturation vapour pressure over water, Pa, from temperature in K."""
    tc = t_k - 273.15
    return 611.2 * torch.exp(17.67 * tc / (tc + 243.5))


def saturation_specific_humidity(t_k: torch.Tensor, p_pa: torch.Tensor) -> torch.Tensor:
    """``q_sat = ε e_s / (p − (1 − ε) e_s)`` in kg/kg; ``e_s`` is capped at p/2 (never reached in
    Held–Suarez temperatures, it only keeps the formula finite)."""
    es = torch.minimum(saturation_vapour_pressure(t_k), 0.5 * p_pa)
    return EPSILON * es / (p_pa - (1.0 - EPSILON) * es)


class SpectralEvaluator:
    """Evaluate modal fields (..., 2M−1, L) of a dinosaur ``RealSphericalHarmonics`` grid at the
    cell centres of ``target`` -> (..., H, W), latitude ascending."""

    def __init__(self, dycore: Dycore, target: Grid):
        sh = dycore.grid.sh
        n_m = dycore.grid.spec.longitude_wavenumbers
        n_l = dycore.grid.spec.total_wavenumbers
        lam = np.deg2rad(target.lon)
        f = np.empty((len(lam), 2 * n_m - 1))
        f[:, 0] = 1.0 / np.sqrt(2.0 * np.pi)
        for m in range(1, n_m):
            f[:, 2 * m - 1] = np.cos(m * lam) / np.sqrt(np.pi)
            f[:, 2 * m] = np.sin(m * lam) / np.sqrt(np.pi)
        lat = np.deg2rad(target.lat)
        p = associated_legendre.evaluate(n_m=n_m, n_l=n_l, x=np.sin(lat))  # (n_m, H, n_l)
        p = np.repeat(p, 2, axis=0)[1:]  # (2M−1, H, L), rows like the model's layout
        dtype = sh.p.dtype
        self.f = torch.as_tensor(f, dtype=dtype)
        self.p = torch.as_tensor(p, dtype=dtype)
        self.cos_lat = torch.as_tensor(np.cos(lat), dtype=dtype)  # (H,)

    def __call__(self, modal: torch.Tensor) -> torch.Tensor:
        px = torch.einsum("mjl,...ml->...mj", self.p, modal)  # (..., 2M−1, H)
        return torch.einsum("im,...mj->...ji", self.f, px)  # (..., H, W)


class Diagnoser:
    """Maps batched model states to the 69 physical channels on ``target`` (see module doc)."""

    def __init__(self, dycore: Dycore, target: Grid, relative_humidity: float = RELATIVE_HUMIDITY):
        self.dycore = dycore
        self.target = target
        self.rh = relative_humidity
        self.eval = SpectralEvaluator(dycore, target)
        dtype = self.eval.f.dtype
        sigma = dycore.sigma
        self.sigma_l = float(sigma[-1])
        self.log_sigma = torch.as_tensor(np.log(sigma), dtype=dtype)  # (L,) ascending
        self.log_sigma_ext = torch.as_tensor(np.log(np.append(sigma, 1.0)), dtype=dtype)
        self.g_weights = torch.as_tensor(primitive_equations.get_geopotential_weights(
            dycore.coords.vertical.coordinates, R_SI), dtype=dtype)  # (L, L), Φ = W @ T
        self.p_levels = torch.as_tensor(np.array(LEVELS, dtype=np.float64) * 100.0, dtype=dtype)
        self.t_ref = float(dycore.spec.reference_temperature)
        self.velocity_unit = float(dycore.physics_specs.nondimensionalize(
            1.0 * scales.units.m / scales.units.s))  # model units per m/s
        self.log_wind = float(np.log(10.0 / ROUGHNESS_M))

    @torch.no_grad()
    def sigma_fields(self, state: primitive_equations.State) -> dict[str, torch.Tensor]:
        """u, v (m/s), t (K), z (m²/s², geopotential) on sigma levels (M, L, H, W); ps (M, H, W) Pa."""
        grid = self.dycore.grid
        u_cos, v_cos = grid.cos_lat_vector(state.vorticity, state.divergence, clip=False)
        cos = self.eval.cos_lat[:, None]
        u = self.eval(u_cos) / cos / self.velocity_unit
        v = self.eval(v_cos) / cos / self.velocity_unit
        t = self.eval(state.temperature_variation) + self.t_ref
        z = torch.einsum("gh,...hij->...gij", self.g_weights, t)  # Φ_s = 0
        ps = torch.exp(self.eval(state.log_surface_pressure[:, 0])) * self.dycore.pa_per_unit
        return {"u": u, "v": v, "t": t, "z": z, "ps": ps}

    @torch.no_grad()
    def __call__(self, state: primitive_equations.State) -> np.ndarray:
        """The 69 channels, (M, 69, H, W) float32, physical units."""
        f = self.sigma_fields(state)
        out = sigma_to_pressure(f, self, self.p_levels)
        m, _, h, w = f["u"].shape
        x = torch.empty((m, N_CHANNELS, h, w), dtype=f["u"].dtype)
        for var in ("z", "u", "v", "t"):
            x[:, channels_of(var)] = out[var]
        p3 = self.p_levels[:, None, None]
        x[:, channels_of("q")] = self.rh * saturation_specific_humidity(out["t"], p3)
        ps = f["ps"]
        t_l, u_l, v_l = f["t"][:, -1], f["u"][:, -1], f["v"][:, -1]
        phi_s = torch.zeros_like(ps)
        log_ps_over_pl = -np.log(self.sigma_l)
        t_s = t_l * np.exp(ALPHA * log_ps_over_pl)
        t_mean = t_s + LAPSE_RATE * phi_s / (2.0 * G_SI)
        (i_msl,) = channels_of("msl")
        (i_t2m,) = channels_of("t2m")
        (i_u10,) = channels_of("u10")
        (i_v10,) = channels_of("v10")
        x[:, i_msl] = ps * torch.exp(phi_s / (R_SI * t_mean))
        x[:, i_t2m] = t_l * np.exp(KAPPA * log_ps_over_pl)
        z_l = R_SI * t_l * log_ps_over_pl / G_SI
        factor = self.log_wind / torch.log(z_l / ROUGHNESS_M)
        x[:, i_u10] = u_l * factor
        x[:, i_v10] = v_l * factor
        return x.numpy().astype(np.float32, copy=False)


def sigma_to_pressure(f: dict[str, torch.Tensor], diag: Diagnoser, p_levels: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Interpolate u, v, t, z from sigma levels to the pressure levels ``p_levels`` (Pa, (P,)).

    ``f`` holds (M, L, H, W) fields and ``ps`` (M, H, W); returns (M, P, H, W) fields.
    """
    ps = f["ps"][:, None]  # (M, 1, H, W)
    x = torch.log(p_levels[:, None, None] / ps)  # log σ of each target level, (M, P, H, W)
    interp = vertical_interpolation.interp
    out = {k: interp(x, diag.log_sigma, f[k]) for k in ("u", "v", "t")}
    z_ext = torch.cat([f["z"], torch.zeros_like(f["z"][:, :1])], dim=1)  # Φ(σ=1) = Φ_s = 0
    z = interp(x, diag.log_sigma_ext, z_ext)
    log_sl = float(np.log(diag.sigma_l))
    below_l = x > log_sl
    t_l = f["t"][:, -1:]
    t_low = t_l * torch.exp(ALPHA * (x - log_sl))
    out["t"] = torch.where(below_l, t_low, out["t"])
    t_s = t_l * np.exp(-ALPHA * log_sl)
    z_ground = (G_SI * t_s / LAPSE_RATE) * (1.0 - torch.exp(ALPHA * x))
    out["z"] = torch.where(x > 0, z_ground, z)
    return out
