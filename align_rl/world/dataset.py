"""The embedded default world: a Held–Suarez (1994) atmosphere simulated with dinosaur-torch.

Commands (``python -m align_rl.data …``):

- ``simulate --out PATH [--grid 32x64|64x128|128x256] [--days N] [--members M] [--seed S]
  [--burn-in DAYS] [--gap DAYS] [--overwrite]``: run one long run from the committed spun-up
  restart, cut into ``M`` members ``--gap`` days apart (independent weather), and write a
  WeatherBench2-layout zarr (69 channels, 6-hourly, member ``m`` as the year ``2000 + m``) with
  normalisation statistics of the training split.
- ``independence PATH``: check that the held-out splits share no weather with the training split
  (:mod:`align_rl.world.independence`); exit status 1 when one does.
- ``spinup [--days 200] [--seed 0] [--out FILE]``: recreate the restart from rest.
- ``stats PATH``: print a store's source, sizes, splits and normalisation statistics.

Python: :func:`ensure_world` (the dataset of a run); states in memory: :func:`align_rl.world.simulate.simulate`.
"""

from __future__ import annotations

from pathlib import Path

from align_rl import identity
from align_rl.config import Config
from align_rl.io import era5
from align_rl.io.wb2_store import parse_attrs
from align_rl.workspace import Workspace
from align_rl.world import simulate as simulation


def stored_attrs(path: str | Path) -> dict:
    """The attributes of a zarr store (JSON-string values decoded); {} when unreadable."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - a missing or broken store simply is not reusable
        return {}
    return parse_attrs(attrs)


def ensure_world(cfg: Config, ws: Workspace, progress: bool = True) -> Path | str:
    """The dataset store of a run.

    ``cfg.data.source == "zarr"``: returns ``cfg.data.path`` unchanged (a ``Path`` for a local
    path, the string itself for a URL such as ``gs://…``; read it with
    :func:`align_rl.io.era5.open_states`). ``"simulate"``: returns ``ws.world``, simulating it first
    when it is absent or its stored ``config_hash`` differs from :func:`align_rl.identity.world`.
    A zarr store gets its normalisation statistics from :func:`ensure_normalization`.
    """
    if cfg.data.source == "zarr":
        p = str(cfg.data.path)
        store = p if "://" in p else Path(p)
        ensure_normalization(cfg, ws, store, progress=progress)
        return store
    path = ws.world
    if path.exists() and stored_attrs(path).get("config_hash") == identity.world(cfg):
        return path
    return simulation.build_world(cfg, path, overwrite=True, progress=progress)


def ensure_normalization(cfg: Config, ws: Workspace, store: Path | str, progress: bool = True):
    """The normalisation statistics of a zarr dataset, registered for ``store`` in this process
    (:func:`align_rl.io.era5.register_normalizer`) so that every reader of the store sees them.

    In order: ``data.normalization`` (a JSON file or a store holding them); the store's own
    ``normalization`` attribute; ``<workdir>/normalization/<key>.json`` computed earlier for this
    store's content and ``data`` section (:func:`align_rl.identity.normalization`); else computed now over ``data.train`` on ``data.grid`` (at most
    ``data.stats_times`` evenly spaced times) and written there. The store is never written.
    Returns the :class:`~align_rl.io.normalization.Normalizer`.
    """
    import json
    import os

    if cfg.data.normalization:
        norm = era5.load_normalizer(cfg.data.normalization)
        era5.register_normalizer(store, norm, cfg.data.normalization)
        return norm
    info = era5.store_info(store)
    if "normalization" in info["attrs"] and "normalization_source" not in info["attrs"]:
        return era5.load_normalizer(store)
    key = identity.dataset(cfg, store)
    path = ws.root / "normalization" / f"{identity.normalization(cfg, store)}.json"
    if path.exists():
        norm = era5.load_normalizer(path)
    else:
        if progress:
            print(f"[data] computing normalisation statistics of {store} over data.train="
                  f"{cfg.data.train} on {cfg.data.grid} (at most {cfg.data.stats_times or 'all'} "
                  f"times) into {path}", flush=True)
        norm, how = era5.stream_normalizer(store, cfg.data.train, cfg.data.grid, cfg.data.coarsen,
                                           cfg.data.stats_times)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**norm.to_dict(), "computed_over": how, "key": key}, indent=1))
        os.replace(tmp, path)
    era5.register_normalizer(store, norm, str(path))
    return norm


__all__ = ["ensure_normalization", "ensure_world", "stored_attrs"]
