"""The dry dynamical core of the embedded world: dinosaur-torch primitive equations + Held–Suarez.

Setup **(choice)**: T21 spectral truncation (64 × 32 Gaussian grid), 20 equally spaced sigma
levels, constant reference temperature 288 K, no orography, semi-implicit IMEX time stepping
(``imex_rk_sil3``, Whitaker & Kar 2013) with a 60-minute step (30 minutes for the spin-up from
rest; 60 minutes ran 55 days from the restart with winds up to 77 m/s, stable), and ∇⁸ hyperdiffusion with an
e-folding time of ``HYPERDIFFUSION_TAU_DAYS`` at the truncation wavenumber. States are dinosaur
``primitive_equations.State`` objects in the modal (spectral) basis, nondimensional
(``SimUnits``), with a leading member axis ``M``: vorticity/divergence/temperature_variation
``(M, 20, 43, 23)``, log_surface_pressure ``(M, 1, 43, 23)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import numpy as np
import torch

from dinosaur_torch import (
    coordinate_systems,
    primitive_equations,
    scales,
    sigma_coordinates,
    spherical_harmonic,
    time_integration,
    units,
)

from align_rl.world.held_suarez import HeldSuarezForcing, HeldSuarezParams

State = primitive_equations.State



@contextlib.contextmanager
def model_threads(n: int | None = None):
    """Run the model on ``n`` intra-op threads (None: unchanged) with denormals flushed to zero.

    A state that starts at rest holds tiny (denormal) spectral coefficients for weeks, and
    denormal arithmetic is ~30x slower on CPUs. ``torch.set_flush_denormal`` only reaches the
    calling thread, not torch's worker threads, so the spin-up from rest runs single-threaded
    (``n=1``); a spun-up state has no denormals. The previous settings are restored.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old)

TRUNCATION = 21
LAYERS = 20
REFERENCE_TEMPERATURE_K = 288.0
DT_MINUTES = 60.0
SPINUP_DT_MINUTES = 30.0  # the spin-up from rest (strong adjustment) uses a shorter step
HYPERDIFFUSION_TAU_DAYS = 0.25
HYPERDIFFUSION_ORDER = 4  # ∇⁸
SURFACE_PRESSURE_PA = 1.0e5


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that defines the discrete model (a restart is only valid for the same spec)."""

    truncation: int = TRUNCATION
    layers: int = LAYERS
    dt_minutes: float = DT_MINUTES
    reference_temperature: float = REFERENCE_TEMPERATURE_K
    hyperdiffusion_tau_days: float = HYPERDIFFUSION_TAU_DAYS
    hyperdiffusion_order: int = HYPERDIFFUSION_ORDER

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _grid_spec(truncation: int) -> spherical_harmonic.GridSpec:
    ctor = getattr(spherical_harmonic.GridSpec, f"T{truncation}", None)
    if ctor is None:
        raise ValueError(f"dinosaur-torch has no T{truncation} grid")
    return ctor


class Dycore:
    """Model, time step and helpers for one :class:`ModelSpec`, on CPU float32."""

    def __init__(self, spec: ModelSpec = ModelSpec(), dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.spec = spec
        self.physics_specs = units.SimUnits.from_si()
        grid_spec = _grid_spec(spec.truncation)(radius=self.physics_specs.radius)
        grid = spherical_harmonic.Grid(grid_spec, device=device, dtype=dtype)
        vertical = sigma_coordinates.SigmaLevels(
            sigma_coordinates.SigmaCoordinates.equidistant(spec.layers), device=device, dtype=dtype)
        self.coords = coordinate_systems.CoordinateSystem(grid, vertical)
        self.t_ref = np.full(spec.layers, spec.reference_temperature)
        orography = torch.zeros(grid.modal_shape, dtype=dtype, device=device)
        self.dynamics = primitive_equations.PrimitiveEquations(
            self.t_ref, orography, self.coords, self.physics_specs)
        self.forcing = HeldSuarezForcing(self.coords, self.physics_specs, self.t_ref,
                                         HeldSuarezParams())
        self.equation = time_integration.compose_equations([self.dynamics, self.forcing])
        self.dt = float(self.physics_specs.nondimensionalize(spec.dt_minutes * scales.units.minute))
        tau = float(self.physics_specs.nondimensionalize(
            spec.hyperdiffusion_tau_days * scales.units.day))
        step = time_integration.imex_rk_sil3(self.equation, self.dt)
        filt = time_integration.horizontal_diffusion_step_filter(
            grid, self.dt, tau, spec.hyperdiffusion_order)
        self._step = time_integration.step_with_filters(step, [filt])
        self.dtype, self.device = dtype, device

    @property
    def grid(self) -> spherical_harmonic.Grid:
        return self.coords.horizontal

    @property
    def sigma(self) -> np.ndarray:
        """Sigma at layer centres, top to bottom, shape (L,)."""
        return self.coords.vertical.coordinates.centers.astype(np.float64)

    @property
    def pa_per_unit(self) -> float:
        return self.forcing.pa_per_unit

    def steps_per(self, hours: float) -> int:
        n = hours * 60.0 / self.spec.dt_minutes
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"{hours} h is not a whole number of {self.spec.dt_minutes}-min steps")
        return int(round(n))

    @torch.no_grad()
    def step(self, state: State) -> State:
        return self._step(state)

    @torch.no_grad()
    def advance(self, state: State, n_steps: int, callback: Callable[[int], None] | None = None
                ) -> State:
        for i in range(n_steps):
            state = self._step(state)
            if callback is not None:
                callback(i)
        return state

    # -- construction of states --------------------------------------------------------------

    def rest_state(self, members: int = 1, temperature: float | None = None,
                   noise_k: float = 0.0, generator: torch.Generator | None = None) -> State:
        """An isothermal atmosphere at rest (surface pressure 1000 hPa), with optional random
        temperature noise of ``noise_k`` K (std, nodal) to break the zonal symmetry."""
        grid = self.grid
        layers = self.spec.layers
        shape = (members, layers) + grid.modal_shape
        zeros = torch.zeros(shape, dtype=self.dtype, device=self.device)
        t0 = (temperature if temperature is not None else self.spec.reference_temperature)
        nodal_t = torch.full((members, layers) + grid.nodal_shape, t0 - self.spec.reference_temperature,
                             dtype=self.dtype, device=self.device)
        if noise_k > 0:
            nodal_t = nodal_t + noise_k * torch.randn(nodal_t.shape, generator=generator,
                                                      dtype=self.dtype)
        lsp_nodal = torch.full((members, 1) + grid.nodal_shape,
                               float(np.log(SURFACE_PRESSURE_PA / self.pa_per_unit)),
                               dtype=self.dtype, device=self.device)
        return State(
            vorticity=zeros.clone(),
            divergence=zeros.clone(),
            temperature_variation=grid.clip_wavenumbers(grid.to_modal(nodal_t)),
            log_surface_pressure=grid.clip_wavenumbers(grid.to_modal(lsp_nodal)),
        )

    def perturb(self, state: State, temperature_k: float, generator: torch.Generator) -> State:
        """Add independent grid-point temperature noise (std ``temperature_k`` K, spectrally
        truncated) to every member of ``state``."""
        grid = self.grid
        t = state.temperature_variation
        noise = temperature_k * torch.randn((t.shape[0], t.shape[1]) + grid.nodal_shape,
                                            generator=generator, dtype=t.dtype)
        return dataclasses.replace(
            state, temperature_variation=t + grid.clip_wavenumbers(grid.to_modal(noise)))

    def rotate(self, state: State, degrees: np.ndarray) -> State:
        """Rotate every member ``i`` eastward by ``degrees[i]`` in longitude (exact in spectral
        space: each zonal wavenumber ``m`` turns by ``m·Δλ``). Held–Suarez forcing is zonally
        symmetric and has no orography, so a rotated state is an equally valid state."""
        n_m = self.grid.spec.longitude_wavenumbers
        lam = torch.as_tensor(np.deg2rad(np.asarray(degrees, np.float64)), dtype=self.dtype)
        m = torch.arange(1, n_m, dtype=self.dtype)
        c = torch.cos(lam[:, None] * m[None])[:, None, :, None]  # (M, 1, n_m−1, 1)
        s = torch.sin(lam[:, None] * m[None])[:, None, :, None]

        def rot(x):
            x = x.clone()
            a_c, a_s = x[..., 1::2, :].clone(), x[..., 2::2, :].clone()
            x[..., 1::2, :] = a_c * c - a_s * s
            x[..., 2::2, :] = a_c * s + a_s * c
            return x

        return State(vorticity=rot(state.vorticity), divergence=rot(state.divergence),
                     temperature_variation=rot(state.temperature_variation),
                     log_surface_pressure=rot(state.log_surface_pressure))


def broadcast_members(state: State, members: int) -> State:
    """Repeat a one-member state ``members`` times along the leading axis."""
    def rep(x):
        return x.expand((members,) + tuple(x.shape[1:])).clone()
    return State(vorticity=rep(state.vorticity), divergence=rep(state.divergence),
                 temperature_variation=rep(state.temperature_variation),
                 log_surface_pressure=rep(state.log_surface_pressure))


@functools.lru_cache(maxsize=2)
def get_dycore(spec: ModelSpec = ModelSpec()) -> Dycore:
    return Dycore(spec)
