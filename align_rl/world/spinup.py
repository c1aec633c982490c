"""The spun-up restart of the embedded world: produce it, save it, load it.

``python -m align_rl.data spinup [--days 200] [--seed 0] [--out FILE]`` integrates the Held–Suarez
model (:mod:`align_rl.world.dycore`) from an isothermal atmosphere at rest (288 K, 1000 hPa) with
0.1 K random temperature noise to break the zonal symmetry. Baroclinic eddies appear after
~60 days and the jets and eddy statistics settle after ~150 days; the final state is saved as the
restart that :mod:`align_rl.world.simulate` starts from (committed as
``align_rl/world/restart/hs_t21_l20.npz``, float32 spectral coefficients, npz-compressed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from align_rl.errors import InputError
from align_rl.world.dycore import SPINUP_DT_MINUTES, Dycore, ModelSpec, State, get_dycore, model_threads

RESTART_DIR = Path(__file__).resolve().parent / "restart"
DEFAULT_RESTART = RESTART_DIR / "hs_t21_l20.npz"
DEFAULT_SPINUP_DAYS = 200
_FIELDS = ("vorticity", "divergence", "temperature_variation", "log_surface_pressure")


def save_restart(path: str | Path, state: State, spec: ModelSpec, meta: dict) -> Path:
    """Save member 0 of ``state`` (modal, nondimensional) with the model spec, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(state, k)[0].detach().cpu().numpy().astype(np.float32) for k in _FIELDS}
    info = {"model": spec.to_dict(), **meta}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, meta=np.array(json.dumps(info)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_restart(path: str | Path = DEFAULT_RESTART, spec: ModelSpec = ModelSpec()
                 ) -> tuple[State, dict]:
    """A one-member :class:`State` (leading axis 1) and the restart's metadata.

    Raises InputError when the file is missing or was made for another model spec."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"restart {path} does not exist; create it with "
                         "`python -m align_rl.data spinup --out {path}`")
    with np.load(path) as f:
        info = json.loads(str(f["meta"]))
        arrays = {k: torch.from_numpy(f[k].astype(np.float32))[None] for k in _FIELDS}
    # the state's representation depends on these (time step and diffusion do not)
    keys = ("truncation", "layers", "reference_temperature")
    if {k: info.get("model", {}).get(k) for k in keys} != {k: spec.to_dict()[k] for k in keys}:
        raise InputError(f"restart {path} was made for model {info.get('model')}, not "
                         f"{spec.to_dict()}; rerun `python -m align_rl.data spinup`")
    return State(**arrays), info


def spinup(days: int = DEFAULT_SPINUP_DAYS, seed: int = 0, dycore: Dycore | None = None,
           progress: bool = True) -> State:
    """Integrate ``days`` days from rest; returns the final one-member state."""
    if days <= 0:
        raise InputError(f"--days must be positive, got {days}")
    d = dycore or get_dycore(dataclasses.replace(ModelSpec(), dt_minutes=SPINUP_DT_MINUTES))
    gen = torch.Generator().manual_seed(seed)
    state = d.rest_state(1, noise_k=0.1, generator=gen)
    n = days * d.steps_per(24)
    with model_threads(1), tqdm(total=n, desc="spin-up (steps)", disable=not progress,
                               unit="step") as bar:
        state = d.advance(state, n, callback=lambda i: bar.update(1))
    return state


def run_spinup(out: str | Path = DEFAULT_RESTART, days: int = DEFAULT_SPINUP_DAYS, seed: int = 0,
               progress: bool = True) -> Path:
    """Spin up and save the restart to ``out``."""
    d = get_dycore(dataclasses.replace(ModelSpec(), dt_minutes=SPINUP_DT_MINUTES))
    state = spinup(days, seed, d, progress)
    for k in _FIELDS:
        if not torch.isfinite(getattr(state, k)).all():
            raise InputError(f"the spin-up blew up ({k} is not finite); nothing was written")
    meta = {"spinup_days": days, "seed": seed,
            "command": f"python -m align_rl.data spinup --days {days} --seed {seed}",
            "initial": "isothermal 288 K at rest, 1000 hPa, 0.1 K temperature noise"}
    return save_restart(out, state, d.spec, meta)
