"""Cache identities: every key under which a run reuses a cached result, computed here.

A key is a content hash: ``sha256`` of the canonical JSON of what the result depends on
(:func:`canonical`: sorted keys, no spaces, numpy values as plain numbers), cut to
:data:`DIGEST_CHARS` hex characters everywhere. Files, networks and dataset stores enter by their
content, never by their path, name, size or modification time: a file or store copied elsewhere
keeps its identity, and touching a file changes nothing.

Which config fields enter which key is declared beside each field, in its dataclass metadata
(:func:`align_rl.config_sections.cached` / :func:`~align_rl.config_sections.runtime`, the cache
names of :data:`CACHES`), and read here (:func:`cache_fields`, :func:`section_dict`): a key holds
every field that declares it, so a new field enters its caches by its declaration alone, and a
test checks that every field declares something. A forecaster enters by its own
``fingerprint()`` (:meth:`align_rl.models.forecaster.Forecaster.fingerprint`).

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
run interrupted before the change (``checkpoints/<model>/<model>-<key>/``) starts afresh. When the
fields came to declare their caches, every key stayed as it was (``tests/test_identity_declared.py``).
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

CACHES: dict[str, str] = {
    "dataset": "the dataset: the simulated world, a store's normalisation statistics, and the "
               "dataset part of every later key (:func:`world`, :func:`data_dict`)",
    "forecaster": "the pretrained forecaster (:func:`pretraining`)",
    "vae": "the pretrained VAE (:func:`pretraining`)",
    "diffusion": "the pretrained diffusion model, the reference (:func:`pretraining`)",
    "backgrounds": "the 48 h background cache (:func:`backgrounds`)",
    "pairs": "the preference store's candidates and scores (:func:`pair_store`)",
    "dpo": "a DPO learner run's folder (:func:`dpo_run`)",
    "dpo_sampled": "a DPO learner run's folder when its schedule has samplers (dpo.mode sync or "
                   "async; :func:`dpo_run`)",
    "sweep_reference": "a sweep's reference validation metrics (:func:`sweep_reference`)",
}
"""The caches a config field may declare (``cached(default, *caches)``), by name."""

CACHES_META = "caches"
"""The metadata key of a config field naming the caches its value enters (``()``: none)."""
UNLESS_SET_META = "unless_set"
"""The metadata key of a config field that counts only when it differs from its default (so that
adding it does not invalidate the caches of runs made before it)."""

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


def forecaster_digest(forecaster: Any) -> str:
    """The identity of a forecaster: its ``fingerprint()`` (every forecaster of
    :mod:`align_rl.models.forecaster`, and a plugin's); for another object, a ``fingerprint``
    string attribute or, for a torch module, its state dict. Else :class:`InputError`."""
    fp = getattr(forecaster, "fingerprint", None)
    if callable(fp):
        return fp()
    name = type(forecaster).__name__
    if isinstance(fp, str):
        return digest({"type": name, "fingerprint": fp})
    if _is_module(forecaster):
        return digest({"type": name, "state": module_digest(forecaster)})
    raise InputError(
        f"cannot fingerprint a forecaster of type {name} for the caches; give it a "
        "`fingerprint()` method (align_rl.models.forecaster.Forecaster) or use a torch module"
    )


# ----------------------------------------------------------------------------- config sections


def _caches_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The caches a config field declares, ``()`` for none, None when it declares nothing."""
    caches = f.metadata.get(CACHES_META)
    return None if caches is None else tuple(caches)


def undeclared(config: Any) -> list[str]:
    """``section.field`` of every field of a config (a :class:`~align_rl.config.Config` or its
    class; every dataclass section) that declares neither its caches nor ``runtime``."""
    return [f"{sec.name}.{f.name}" for sec in dataclasses.fields(config)
            for f in dataclasses.fields(_section_type(config, sec)) if _caches_of(f) is None]


def _section_type(config: Any, sec: dataclasses.Field) -> Any:
    if not isinstance(config, type):
        return type(getattr(config, sec.name))
    return sec.default_factory if callable(sec.default_factory) else sec.type


def cache_fields(config: Any, cache: str) -> dict[str, tuple[str, ...]]:
    """``{section: (field, ...)}`` of the fields that declare ``cache`` (sections without one left
    out), in declaration order."""
    if cache not in CACHES:
        raise KeyError(f"unknown cache {cache!r}; one of {', '.join(CACHES)}")
    out = {}
    for sec in dataclasses.fields(config):
        names = tuple(f.name for f in dataclasses.fields(_section_type(config, sec))
                      if cache in (_caches_of(f) or ()))
        if names:
            out[sec.name] = names
    return out


def section_dict(cfg: Config, name: str, *caches: str) -> dict[str, Any]:
    """A config section as a dict for an identity: the fields that declare one of ``caches`` (none
    given: every field), those declared ``unless_set`` only when they differ from their default
    (so that adding a key does not invalidate caches)."""
    sec = getattr(cfg, name)
    out = dataclasses.asdict(sec)
    for f in dataclasses.fields(sec):
        wanted = not caches or bool(set(caches) & set(_caches_of(f) or ()))
        if not wanted or (f.metadata.get(UNLESS_SET_META) and getattr(sec, f.name) == f.default):
            out.pop(f.name)
    return out


def section_digest(cfg: Config, *sections: str) -> str:
    """The content hash of some config sections (:func:`section_dict` of each, every field)."""
    return digest({name: section_dict(cfg, name) for name in sections})


def _parts(cfg: Config, *caches: str) -> dict[str, dict[str, Any]]:
    """``{section: section_dict(cfg, section, *caches)}`` of every section with a field that
    declares one of ``caches``. Each key below takes the sections it places by name
    (``parts.pop``) and keeps the rest (:func:`_rest`), so a field declared later in another
    section enters the key too."""
    names = {sec for c in caches for sec in cache_fields(cfg, c)}
    return {sec.name: section_dict(cfg, sec.name, *caches) for sec in dataclasses.fields(cfg)
            if sec.name in names}


def _rest(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sections a key does not place by name, nested under their names (e.g. ``pretrain`` in
    the pretraining keys when ``pretrain.val_every`` is changed)."""
    return {name: d for name, d in parts.items() if d}


def data_dict(cfg: Config) -> dict[str, Any]:
    """The fields that declare the ``dataset`` cache as they enter identities: the ``data``
    section without ``path`` (``runtime``: the store enters by its content, :func:`dataset`), with
    a ``normalization`` file or store by its content."""
    parts = _parts(cfg, "dataset")
    d = {**parts.pop("data", {}), **_rest(parts)}
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


FORECAST_FIRST_FRAME = "background(t-6h)+increment"
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
    """The identity of a pretrained stage (``forecaster``, ``vae``, ``diffusion``): the fields that
    declare the stage's cache (its own section's under ``config``: not the score model's workers
    and CPUs; ``run.seed``), the dataset, the model grid ``(H, W)`` and ``deps``
    (:func:`diffusion_deps` for the diffusion model). Stored in the checkpoint."""
    parts = _parts(cfg, stage)
    return {"stage": stage, "config": parts.pop(stage, {}), **parts.pop("run", {}),
            "data": dataset(cfg, store), "grid": [int(v) for v in grid], "deps": dict(deps or {}),
            **_rest(parts)}


def diffusion_deps(codec: Any, forecaster: Any) -> dict[str, str]:
    """What the diffusion model is trained on besides the data: the VAE (latents) and the
    forecaster (backgrounds), by content."""
    return {"vae": module_digest(codec), "forecaster": forecaster_digest(forecaster)}


def backgrounds(cfg: Config, ws: Any, states: Any, forecaster: Any, normalizer: Any,
                lead_hours: int) -> dict[str, Any]:
    """The key of the background cache (one store for every split, so not the states' times):
    the run's dataset (:func:`dataset` of :func:`run_store`; for states that are not read from
    a store, e.g. in tests, their ``source`` attribute), the statistics the forecaster's inputs
    are normalised with, the grid, the forecaster (:func:`forecaster_digest`), the lead time and
    any field that declares the ``backgrounds`` cache (none today)."""
    store = run_store(cfg, ws)
    local = "://" not in str(store)
    if not local or Path(store).exists():
        data: Any = dataset(cfg, store)
    else:
        data = {"source": str(states.attrs.get("source", "unknown")), "data": data_digest(cfg)}
    return {"dataset": data, "normalization": digest(normalizer.to_dict()),
            "grid": f"{len(states.lat)}x{len(states.lon)}",
            "forecaster": forecaster_digest(forecaster), "lead_hours": int(lead_hours),
            **_rest(_parts(cfg, "backgrounds"))}


def reference(path: str | Path) -> str:
    """The reference (pretrained diffusion) checkpoint: its bytes (:func:`file_digest`)."""
    return file_digest(path)


def pair_store(cfg: Config, reference_ckpt: str | Path) -> dict[str, str]:
    """What the candidates of the preference store depend on (its ``meta``, checked when it is
    reopened): the dataset, the fields that declare the ``pairs`` cache (the observation, sampler
    and guidance sections each by its digest; the candidate settings: rewards, count, guidance,
    seed, preference split) and the reference checkpoint."""
    parts = _parts(cfg, "pairs")
    sections = {name: digest({name: parts.pop(name, {})}) for name in ("obs", "sampler", "guidance")}
    candidates = {"rewards": parts.pop("rewards", {}), "pairs": parts.pop("pairs", {}),
                  **parts.pop("run", {}), **parts.pop("data", {}), "first_frame": FORECAST_FIRST_FRAME,
                  **_rest(parts)}
    return {"data": data_digest(cfg), **sections, "candidates": digest(candidates),
            "reference": reference(reference_ckpt)}


def dpo_run(cfg: Config, meta: dict) -> str:
    """The key of a DPO learner folder: the preference store's ``meta`` (:func:`pair_store`) and
    the fields that declare the ``dpo`` cache (the ``dpo`` section but ``seeds``, the reward
    weights and normalisation, the pair settings) and, for the schedules with samplers (``sync``,
    ``async``), ``dpo_sampled`` (the ``dpo`` fields only they read: an offline run's key leaves
    them out, so adding one does not retrain offline results)."""
    caches = ("dpo",) if cfg.dpo.mode == "offline" else ("dpo", "dpo_sampled")
    parts = _parts(cfg, *caches)
    return digest({"meta": meta, "dpo": parts.pop("dpo", {}), **parts.pop("rewards", {}),
                   "pairs": parts.pop("pairs", {}), **_rest(parts)})


def sweep_reference(cfg: Config, validation: dict, reference_ckpt: str | Path) -> dict[str, Any]:
    """The key of a sweep's cached reference validation metrics: the validation settings, the
    fields that declare the ``sweep_reference`` cache (the validation split, the seed, the sampler,
    observation and guidance sections) and the reference checkpoint (by content, as in
    :func:`pair_store`)."""
    parts = _parts(cfg, "sweep_reference")
    sections = {name: digest({name: parts.pop(name, {})}) for name in ("sampler", "obs", "guidance")}
    return {"validation": dict(validation), **parts.pop("data", {}), **parts.pop("run", {}),
            "first_frame": FORECAST_FIRST_FRAME, **sections, "reference": reference(reference_ckpt),
            **_rest(parts)}


def clear_memo() -> None:
    """Forget the remembered file and store digests (tests)."""
    _FILE_MEMO.clear()
    _STORE_MEMO.clear()


__all__ = ["CACHES", "DIGEST_CHARS", "array_digest", "backgrounds", "cache_fields", "canonical",
           "data_dict", "data_digest", "dataset", "diffusion_deps", "undeclared",
           "digest", "dpo_run", "file_digest", "forecaster_digest", "module_digest", "normalization",
           "pair_store", "pretraining", "reference", "run_store", "same", "section_dict",
           "section_digest", "store_digest", "sweep_reference", "world", "clear_memo"]

