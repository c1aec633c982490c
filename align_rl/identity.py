"""Cache identities: every key under which a run reuses a cached result, computed here.

A key is a content hash: ``sha256`` of the canonical JSON of what the result depends on
(:func:`canonical`: sorted keys, no spaces, numpy values as plain numbers), cut to
:data:`DIGEST_CHARS` hex characters everywhere. Files, networks and dataset stores enter by their
content, never by their path, name, size or modification time: a file or store copied elsewhere
keeps its identity, and touching a file changes nothing.

Each cache, its identity and where the key is kept:

- simulated world: :func:`world` (the ``data`` section); the store's ``config_hash`` attribute.
- normalisation statistics of a zarr store: :func:`normalization` (store content, ``data``);
  ``normalization/<key>.json``.
- pretrained stage: :func:`pretraining` (stage section, dataset, grid, seed; the diffusion model
  also the VAE and the forecaster, :func:`diffusion_deps`); the checkpoint's ``extra["identity"]``.
- backgrounds: :func:`backgrounds` (dataset, statistics, grid, forecaster, lead); the
  ``background_key`` attribute of ``backgrounds.zarr``.
- preference store: :func:`pair_store` (sections, candidate settings, reference checkpoint); the
  store's ``meta`` (a store for other inputs is set aside as ``pairs-<key>.zarr``).
- reference checkpoint: :func:`reference` (the file's bytes), inside the pair-store and sweep keys.
- DPO run folder: :func:`dpo_run` (pair-store identity, ``dpo``, weights); ``dpo/<variant>-<mode>-<key>``.
- sweep reference metrics: :func:`sweep_reference` (validation settings, reference);
  ``reference_val.json``.

The keys changed once, when they moved here (one digest length, stores by content instead of
path): caches in workdirs written before are not recognised and are simply rebuilt. A default
preference store is moved aside to ``pairs-<key>.zarr``, never deleted (one set with
``pairs.store`` is refused as built for other inputs: point it at a new folder), and a pretraining
run interrupted before the change (``checkpoints/<model>/<model>-<key>/``) starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from align_rl.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from align_rl.config import Config

DIGEST_CHARS = 16
"""Hex characters of every cache key (64 bits)."""

RESOURCE_KEYS = ("num_workers", "cpus_per_worker")
"""Fields of a model section that say how it trains, not what it is (left out of its identity)."""

VOLATILE_ATTRS = ("wall_seconds", "threads", "threads_dropped_to_1_at_step", "seconds")
"""Store attributes that record how a store was written (timings), not what it holds."""

_CHUNK = 1 << 20
_FILE_MEMO: dict[tuple[str, int, int], str] = {}
_STORE_MEMO: dict[tuple, str] = {}


# ----------------------------------------------------------------------------- primitives


def _plain(obj: Any) -> Any:
    """JSON fallback: numpy values as numbers / lists, paths and anything else as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def canonical(obj: Any) -> str:
    """The canonical JSON text of ``obj`` (sorted keys, compact; tuples as lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain)


def digest(obj: Any) -> str:
    """The content hash of ``obj``: sha256 of :func:`canonical`, :data:`DIGEST_CHARS` hex characters."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:DIGEST_CHARS]


def same(a: Any, b: Any) -> bool:
    """Whether two identities are equal (compared by their canonical JSON, so a dict read back
    from a file with lists equals the one built with tuples)."""
    return canonical(a) == canonical(b)


def _hex(h) -> str:
    return h.hexdigest()[:DIGEST_CHARS]


def file_digest(path: str | Path) -> str:
    """The content hash of a file (read in 1 MiB chunks). Remembered in this process by
    ``(path, size, mtime_ns)`` so that a file is read once; the key is still its bytes (a touched
    file gets the same digest, a file with other bytes another)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(f"{p} does not exist; its content identifies a cache") from None
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        _FILE_MEMO[memo] = _hex(h)
    return _FILE_MEMO[memo]


def _array_bytes(v: Any) -> tuple[str, tuple, bytes]:
    """``(dtype, shape, bytes)`` of a tensor or array (bfloat16 tensors via float32, exact)."""
    if hasattr(v, "detach"):  # a torch tensor
        t = v.detach().cpu().contiguous()
        try:
            a = t.numpy()
        except TypeError:  # dtypes numpy lacks (bfloat16): widened exactly
            a = t.float().numpy()
        return str(t.dtype), tuple(t.shape), a.tobytes()
    a = np.ascontiguousarray(v)
    return a.dtype.str, a.shape, a.tobytes()


def array_digest(*arrays: Any) -> str:
    """The content hash of arrays or tensors (dtype, shape and values of each)."""
    h = hashlib.sha256()
    for a in arrays:
        dt, shape, data = _array_bytes(a)
        h.update(f"{dt}{shape}".encode())
        h.update(data)
    return _hex(h)


def module_digest(module: Any) -> str:
    """The content hash of a network's state dict (names, dtypes, shapes and values; any
    ``torch.nn.Module``): equal weights give equal digests, whatever the object."""
    h = hashlib.sha256()
    state = module.state_dict()
    for k in sorted(state):
        h.update(k.encode())
        v = state[k]
        if hasattr(v, "detach") or isinstance(v, np.ndarray):
            dt, shape, data = _array_bytes(v)
            h.update(f"{dt}{shape}".encode())
            h.update(data)
        else:  # extra state
            h.update(canonical(v).encode())
    return _hex(h)


def _is_module(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "parameters", None))


def forecaster_digest(forecaster: Any, cfg: Config | None = None) -> str:
    """The identity of a forecaster (:mod:`align_rl.models.forecaster`): a ``fingerprint`` string
    attribute when it has one; a torch module's state dict; a wrapped module's state dict with
    its conversion statistics; a regridded forecaster's inner one and both grids; an ONNX model's
    files ``cfg.forecaster.{path, mean_path, std_path}`` by content."""
    parts: dict[str, Any] = {"type": type(forecaster).__name__}
    fp = getattr(forecaster, "fingerprint", None)
    module = getattr(forecaster, "module", None)
    if isinstance(fp, str):
        parts["fingerprint"] = fp
    elif _is_module(forecaster):
        parts["state"] = module_digest(forecaster)
    elif _is_module(module):
        parts["state"] = module_digest(module)
        stats = [v for v in (getattr(forecaster, "_a", None), getattr(forecaster, "_b", None)) if v is not None]
        parts["stats"] = array_digest(*stats) if stats else None
        parts["flip"] = bool(getattr(forecaster, "flip", False))
    elif getattr(forecaster, "inner", None) is not None:
        parts["inner"] = forecaster_digest(forecaster.inner, cfg)
        parts["grids"] = [str(getattr(forecaster, "model", "")), str(getattr(forecaster, "native", ""))]
    elif cfg is not None and cfg.forecaster.path:
        f = cfg.forecaster
        parts["files"] = [file_digest(p) if p else None for p in (f.path, f.mean_path, f.std_path)]
        parts["lat_north_to_south"] = bool(f.lat_north_to_south)
    else:
        raise InputError(
            f"cannot fingerprint a forecaster of type {type(forecaster).__name__} for the caches; "
            "give it a `fingerprint` string attribute or use a torch / ONNX forecaster"
        )
    return digest(parts)


# ----------------------------------------------------------------------------- config sections


def section_dict(cfg: Config, name: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config section as a dict for an identity: fields marked ``HASH_UNLESS_SET``
    (:mod:`align_rl.config`) count only when they differ from their default, so that adding a
    key does not invalidate caches; ``drop`` lists fields left out."""
    sec = getattr(cfg, name)
    out = dataclasses.asdict(sec)
    for f in dataclasses.fields(sec):
        if f.name in drop or (f.metadata.get("hash") == "unless-set" and getattr(sec, f.name) == f.default):
            out.pop(f.name)
    return out


def section_digest(cfg: Config, *sections: str) -> str:
    """The content hash of some config sections (:func:`section_dict` of each)."""
    return digest({name: section_dict(cfg, name) for name in sections})


def data_dict(cfg: Config) -> dict[str, Any]:
    """The ``data`` section as it enters identities: without ``path`` (the store enters by its
    content, :func:`dataset`) and with a ``normalization`` file or store by its content."""
    d = section_dict(cfg, "data", drop=("path",))
    norm = d.get("normalization")
    if norm:
        remote = "://" in str(norm)
        if not remote and not Path(norm).exists():
            raise InputError(f"data.normalization={norm} does not exist; give a statistics file "
                             "(python -m align_rl.data stats STORE --out FILE) or unset it")
        d["normalization"] = file_digest(norm) if not remote and Path(norm).is_file() else store_digest(norm)
    return d


def data_digest(cfg: Config) -> str:
    """The content hash of :func:`data_dict`."""
    return digest(data_dict(cfg))


# ----------------------------------------------------------------------------- dataset stores


def _store_memo_key(path: str) -> tuple:
    if "://" in path:
        return (path,)  # a remote store is taken as fixed for the life of the process
    p = Path(path).expanduser().resolve()
    stamps = []
    for name in ("", "zarr.json", ".zmetadata", ".zattrs", ".zgroup"):
        try:
            st = (p / name).stat()
            stamps.append((name, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            pass
    return (str(p), tuple(stamps))


def _open_raw(path: str):
    """The store as an xarray Dataset of raw stored values (no decoding, no dask)."""
    import warnings

    import xarray as xr  # heavy: only when a store is identified

    kwargs: dict[str, Any] = {"storage_options": {"token": "anon"}} if path.startswith("gs://") else {}
    if "://" not in path and not Path(path).exists():
        raise InputError(f"store {path} does not exist; check the path (data.path)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*consolidated.*")
            return xr.open_zarr(path, chunks=None, decode_cf=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - not a zarr store, a broken store
        raise InputError(f"cannot open {path} as a zarr store: {exc}") from None


_TIME_DIMS = ("time", "valid_time")
_SPACE_DIMS = ("latitude", "longitude", "lat", "lon")


def _sample(ds) -> dict[str, Any]:
    """Values of one field at the first and the last time: the first variable (by name) on
    ``(time, lat, lon)``, else the first variable's first level. Two 2-D fields are read."""
    timed = sorted(n for n, v in ds.data_vars.items() if any(d in _TIME_DIMS for d in v.dims))
    if not timed:
        return {}
    flat = [n for n in timed if ds[n].ndim == 3]
    name = (flat or timed)[0]
    da = ds[name]
    t = next(d for d in da.dims if d in _TIME_DIMS)
    sel = {d: 0 for d in da.dims if d != t and d not in _SPACE_DIMS}
    vals = np.asarray(da.isel({t: [0, da.sizes[t] - 1], **sel}).values)
    return {"variable": name, "values": array_digest(vals)}


def store_digest(path: str | Path) -> str:
    """The content identity of a WeatherBench2-layout zarr store (local path or URL): its
    attributes (without :data:`VOLATILE_ATTRS`), every coordinate's values (grid, levels, times),
    every variable's name, dimensions, shape, dtype and attributes, and the values of one field at
    the first and last time (:func:`_sample`). Not the path: a copied store keeps its identity.
    Remembered in this process while the store's metadata files are unchanged."""
    p = str(path)
    memo = _store_memo_key(p)
    if memo in _STORE_MEMO:
        return _STORE_MEMO[memo]
    ds = _open_raw(p)
    attrs = {k: v for k, v in ds.attrs.items() if k not in VOLATILE_ATTRS}
    coords = {k: {"dims": list(v.dims), "attrs": dict(v.attrs), "values": array_digest(np.asarray(v.values))}
              for k, v in ds.coords.items()}
    variables = {k: {"dims": list(v.dims), "shape": list(v.shape), "dtype": v.dtype.str,
                     "attrs": dict(v.attrs)} for k, v in ds.data_vars.items()}
    out = digest({"attrs": attrs, "coords": coords, "variables": variables, "sample": _sample(ds)})
    _STORE_MEMO[memo] = out
    return out


def run_store(cfg: Config, ws: Any) -> str | Path:
    """Where the run's dataset lies (what :func:`align_rl.world.dataset.ensure_world` returns):
    ``ws.world`` for the simulated world, ``data.path`` for a zarr store."""
    if cfg.data.source == "zarr":
        p = str(cfg.data.path)
        return p if "://" in p else Path(p)
    return Path(ws.world)


# ----------------------------------------------------------------------------- named identities


FORECAST_FIRST_FRAME = "background(t-6h)"
"""The first frame of every 48 h forecast from an analysis (rewards, validation, evaluation):
docs/method.md §7.3. Part of the keys of what those forecasts feed."""

WORLD_LAYOUT = "one-run-gap/2"
"""How the embedded world lays its members out (:func:`align_rl.world.simulate.simulate`): a new
value invalidates worlds simulated by an earlier scheme (version 1 perturbed copies of one state,
which shared weather between the splits)."""


def world(cfg: Config) -> str:
    """The simulated world's key: the ``data`` section (:func:`data_dict`) and the layout scheme
    (:data:`WORLD_LAYOUT`)."""
    return digest({"data": data_dict(cfg), "layout": WORLD_LAYOUT})


def dataset(cfg: Config, store: str | Path) -> dict[str, str]:
    """The dataset of a run: the store's content (:func:`store_digest`) and the ``data`` section
    (:func:`data_digest`: splits, grid, coarsening, statistics; not the store's path)."""
    return {"store": store_digest(store), "data": data_digest(cfg)}


def normalization(cfg: Config, store: str | Path) -> str:
    """The key of the normalisation statistics computed for a zarr store."""
    return digest(dataset(cfg, store))


def pretraining(cfg: Config, stage: str, store: str | Path, grid, deps: dict[str, str] | None = None) -> dict:
    """The identity of a pretrained stage (``forecaster``, ``vae``, ``diffusion``): its config
    section without :data:`RESOURCE_KEYS`, the dataset, the model grid ``(H, W)``, the seed and
    ``deps`` (:func:`diffusion_deps` for the diffusion model). Stored in the checkpoint."""
    return {"stage": stage, "config": section_dict(cfg, stage, drop=RESOURCE_KEYS),
            "data": dataset(cfg, store), "grid": [int(v) for v in grid], "seed": int(cfg.run.seed),
            "deps": dict(deps or {})}


def diffusion_deps(codec: Any, forecaster: Any, cfg: Config) -> dict[str, str]:
    """What the diffusion model is trained on besides the data: the VAE (latents) and the
    forecaster (backgrounds), by content."""
    return {"vae": module_digest(codec), "forecaster": forecaster_digest(forecaster, cfg)}


def backgrounds(cfg: Config, ws: Any, states: Any, forecaster: Any, normalizer: Any,
                lead_hours: int) -> dict[str, Any]:
    """The key of the background cache (one store for every split, so not the states' times):
    the run's dataset (:func:`dataset` of :func:`run_store`; for states that are not read from
    a store, e.g. in tests, their ``source`` attribute), the statistics the forecaster's inputs
    are normalised with, the grid, the forecaster and the lead time."""
    store = run_store(cfg, ws)
    local = "://" not in str(store)
    if not local or Path(store).exists():
        data: Any = dataset(cfg, store)
    else:
        data = {"source": str(states.attrs.get("source", "unknown")), "data": data_digest(cfg)}
    return {"dataset": data, "normalization": digest(normalizer.to_dict()),
            "grid": f"{len(states.lat)}x{len(states.lon)}",
            "forecaster": forecaster_digest(forecaster, cfg), "lead_hours": int(lead_hours)}


def reference(path: str | Path) -> str:
    """The reference (pretrained diffusion) checkpoint: its bytes (:func:`file_digest`)."""
    return file_digest(path)


def pair_store(cfg: Config, reference_ckpt: str | Path) -> dict[str, str]:
    """What the candidates of the preference store depend on (its ``meta``, checked when it is
    reopened): dataset, observations, sampler and guidance sections, the candidate settings
    (rewards, count, guidance, seed, preference split) and the reference checkpoint."""
    r, p = cfg.rewards, cfg.pairs
    candidates = {"rewards": {"names": list(r.names), "forecast_hours": r.forecast_hours,
                              "geo_level": r.geo_level, "geo_equator_band": r.geo_equator_band},
                  "pairs": {"candidates": p.candidates, "guidance": p.guidance},
                  "seed": cfg.run.seed, "pref": cfg.data.pref, "first_frame": FORECAST_FIRST_FRAME}
    return {"data": data_digest(cfg), "obs": section_digest(cfg, "obs"),
            "sampler": section_digest(cfg, "sampler"), "guidance": section_digest(cfg, "guidance"),
            "candidates": digest(candidates), "reference": reference(reference_ckpt)}


DPO_NOT_A_RUN = ("seeds",)
"""``dpo`` fields that no single learner run depends on (how many seeds the main job runs)."""
DPO_WITH_SAMPLERS = ("sync_every", "staleness", "online_backgrounds", "reuse", "refresh_reference",
                     "warm_start")
"""``dpo`` fields that only the schedules with samplers read (sync rounds, async): left out of an
offline run's key, so adding one does not retrain offline results."""


def dpo_run(cfg: Config, meta: dict) -> str:
    """The key of a DPO learner folder: the preference store's ``meta`` (:func:`pair_store`), the
    ``dpo`` section (without :data:`DPO_NOT_A_RUN`, and offline without
    :data:`DPO_WITH_SAMPLERS`), the reward weights and normalisation and the pair settings."""
    pairs = {k: v for k, v in section_dict(cfg, "pairs").items() if k not in ("variants", "mode", "store")}
    drop = DPO_NOT_A_RUN + (DPO_WITH_SAMPLERS if cfg.dpo.mode == "offline" else ())
    return digest({"meta": meta, "dpo": section_dict(cfg, "dpo", drop=drop), "weights": cfg.rewards.weights,
                   "normalize": cfg.rewards.normalize, "pairs": pairs})


def sweep_reference(cfg: Config, validation: dict, reference_ckpt: str | Path) -> dict[str, Any]:
    """The key of a sweep's cached reference validation metrics: the validation settings, the
    validation split, the seed, the sampler, observation and guidance sections and the reference
    checkpoint (by content, as in :func:`pair_store`)."""
    return {"validation": dict(validation), "val": list(cfg.data.val), "seed": int(cfg.run.seed),
            "first_frame": FORECAST_FIRST_FRAME,
            "sampler": section_digest(cfg, "sampler"), "obs": section_digest(cfg, "obs"),
            "guidance": section_digest(cfg, "guidance"), "reference": reference(reference_ckpt)}


def clear_memo() -> None:
    """Forget the remembered file and store digests (tests)."""
    _FILE_MEMO.clear()
    _STORE_MEMO.clear()


__all__ = ["DIGEST_CHARS", "array_digest", "backgrounds", "canonical", "data_dict", "data_digest",
           "dataset", "diffusion_deps",
           "digest", "dpo_run", "file_digest", "forecaster_digest", "module_digest", "normalization",
           "pair_store", "pretraining", "reference", "run_store", "same", "section_dict",
           "section_digest", "store_digest", "sweep_reference", "world", "clear_memo"]

