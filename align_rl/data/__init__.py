"""The embedded default world: a Held–Suarez (1994) atmosphere simulated with dinosaur-torch.

Commands (``python -m align_rl.data …``):

- ``simulate --out PATH [--grid 32x64|64x128|128x256] [--days N] [--members M] [--seed S]
  [--burn-in DAYS] [--overwrite]``: run ``M`` perturbed members as one batch from the committed
  spun-up restart and write a WeatherBench2-layout zarr (69 channels, 6-hourly, member ``m`` as
  the year ``2000 + m``) with normalisation statistics of the training split.
- ``spinup [--days 200] [--seed 0] [--out FILE]``: recreate the restart from rest.
- ``stats PATH``: print a store's source, sizes, splits and normalisation statistics.

Python: :func:`ensure_world` (the dataset of a run), :func:`simulate` (states in memory).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..workspace import Workspace


def stored_attrs(path: str | Path) -> dict:
    """The attributes of a zarr store (JSON-string values decoded); {} when unreadable."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - a missing or broken store simply is not reusable
        return {}
    from ..era5 import _parse_attrs

    return _parse_attrs(attrs)


def ensure_world(cfg: Config, ws: Workspace, progress: bool = True) -> Path | str:
    """The dataset store of a run.

    ``cfg.data.source == "zarr"``: returns ``cfg.data.path`` unchanged (a ``Path`` for a local
    path, the string itself for a URL such as ``gs://…``; read it with
    :func:`align_rl.era5.open_states`). ``"simulate"``: returns ``ws.world``, simulating it first
    when it is absent or its stored ``config_hash`` differs from ``cfg.section_hash("data")``.
    """
    if cfg.data.source == "zarr":
        p = str(cfg.data.path)
        return p if "://" in p else Path(p)
    from .simulate import build_world

    path = ws.world
    if path.exists() and stored_attrs(path).get("config_hash") == cfg.section_hash("data"):
        return path
    return build_world(cfg, path, overwrite=True, progress=progress)


def simulate(*args, **kwargs):
    """See :func:`align_rl.data.simulate.simulate`."""
    from .simulate import simulate as _simulate

    return _simulate(*args, **kwargs)


__all__ = ["ensure_world", "simulate", "stored_attrs"]
