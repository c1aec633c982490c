"""Append-only zarr preference store: backgrounds, scored candidates and pairs (docs/method.md §8).

Layout (one zarr v3 group, local path)::

    COMMIT                       JSON {"backgrounds": nb, "candidates": nc, "pairs": np,
                                       "min_version": v} — the only rows readers see
    backgrounds/latent  (nb, C, h, w) f4   standardised background latent z_b
    backgrounds/bg_id   (nb,) i8           id of the background (position in the pref split)
    backgrounds/time    (nb,) i8           analysis time, ns since 1970
    backgrounds/version (nb,) i4           policy version that drew its candidates
    backgrounds/guidance(nb,) i1           index into attrs["guidance_names"]
    candidates/latent   (nc, C, h, w) f4   candidate analysis latents z_a
    candidates/background (nc,) i8         row in backgrounds
    candidates/member   (nc,) i4           member index within its background
    candidates/version  (nc,) i4
    candidates/scores   (nc, K) f8         every reward component, names in attrs["reward_names"]
    pairs/winner, pairs/loser (np,) i8     rows in candidates
    pairs/background    (np,) i8           row in backgrounds
    pairs/hash          (np, 16) u1        content hash of (z_b, z_w, z_l) (align_rl.pairs.pair_hash)
    pairs/mode          (np,) u1           0 = M, 1 = P
    pairs/version       (np,) i4           policy version of the candidates

Commits are atomic: :meth:`PairStore.append` writes the rows of a batch past the committed counts,
then replaces ``COMMIT`` (write to a temporary file, ``os.replace``). A crash mid-append leaves
rows past the counts that no reader sees and that the next append overwrites, so a rerun resumes.
Duplicates never enter: a background group already committed with the same ``(bg_id, version,
guidance)`` is skipped, and a pair whose ``(hash, mode)`` is already stored is dropped.
One writer at a time (the driver); any number of readers (learner workers) while it appends.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError, InputError
from .pairs import HASH_BYTES, MODES, background_pairs, pair_hash, pair_rng

FORMAT = "align_rl.pairs/1"
GUIDANCES = ("obsfree", "repaint", "dps")
_COMMIT = "COMMIT"


@dataclass
class CandidateGroup:
    """The N scored candidates of one background, and its pairs per mode, ready to commit.

    ``z_b`` (C, h, w); ``latents`` (N, C, h, w); ``scores`` {reward: (N,)}; ``pairs``
    {mode: (P, 2) local candidate indices (winner, loser)}; ``time`` datetime64 or ns int.
    """

    bg_id: int
    time: int
    version: int
    guidance: str
    z_b: np.ndarray
    latents: np.ndarray
    scores: dict[str, np.ndarray]
    pairs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int, str]:
        return (int(self.bg_id), int(self.version), self.guidance)


@dataclass
class PairSet:
    """A set of pairs as rows into a store's candidates: ``winner``, ``loser``, ``background``
    (P,) int64, ``version`` (P,) int32, ``hash`` (P, 16) uint8, and the ``mode`` that chose them."""

    winner: np.ndarray
    loser: np.ndarray
    background: np.ndarray
    version: np.ndarray
    hash: np.ndarray
    mode: str

    def __len__(self) -> int:
        return int(len(self.winner))


def _ns(t) -> int:
    if isinstance(t, (int, np.integer)):
        return int(t)
    return int(np.datetime64(t, "ns").astype(np.int64))


class PairStore:
    """The preference store at ``path`` (created on first :meth:`open` with ``latent_shape``)."""

    def __init__(self, path: str | Path, group, reward_names: list[str], latent_shape: tuple):
        self.path = Path(path)
        self.g = group
        self.reward_names = list(reward_names)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self._hashes: set[tuple[bytes, int]] | None = None
        self._keys: set[tuple[int, int, str]] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, latent_shape: Sequence[int] | None = None,
             reward_names: Sequence[str] | None = None, meta: Mapping | None = None,
             mode: str = "a") -> "PairStore":
        """Open (``mode="r"``) or open-or-create (``"a"``) the store.

        Creating needs ``latent_shape`` (C, h, w) and ``reward_names``. ``meta`` (e.g. the data
        and reference-model identity) is stored on creation and must match on reopening.
        """
        import zarr

        p = Path(path)
        exists = (p / _COMMIT).exists()
        if not exists and mode == "r":
            raise InputError(f"no preference store at {p}; build pairs first (python -m align_rl.train)")
        if exists:
            g = zarr.open_group(str(p), mode="r" if mode == "r" else "a")
            attrs = dict(g.attrs)
            if attrs.get("format") != FORMAT:
                raise InputError(f"{p} is not an align_rl preference store (format {attrs.get('format')!r})")
            ls = tuple(attrs["latent_shape"])
            if latent_shape is not None and tuple(int(v) for v in latent_shape) != ls:
                raise InputError(f"preference store {p} holds latents {ls}, not {tuple(latent_shape)}; "
                                 "use another pairs.store or delete it")
            names = list(attrs["reward_names"])
            if reward_names is not None and list(reward_names) != names:
                raise ConfigError(f"preference store {p} was scored with rewards {names}, the config "
                                  f"asks for {list(reward_names)}; use another pairs.store")
            if meta is not None:
                old = attrs.get("meta", {})
                diff = {k: (old.get(k), v) for k, v in dict(meta).items() if old.get(k) != v}
                if diff:
                    raise InputError(f"preference store {p} was built for other inputs {diff}; "
                                     "use another pairs.store or delete it")
            return cls(p, g, names, ls)
        if latent_shape is None or reward_names is None:
            raise InputError(f"creating the preference store {p} needs latent_shape and reward_names")
        p.mkdir(parents=True, exist_ok=True)
        g = zarr.open_group(str(p), mode="a")
        C, h, w = (int(v) for v in latent_shape)
        K = len(reward_names)
        lat_chunk = max(1, (1 << 21) // (4 * C * h * w))  # ~2 MiB chunks

        def arr(name, shape, dtype, chunk_rows):
            if name not in g:
                g.create_array(name, shape=(0, *shape), chunks=(chunk_rows, *shape), dtype=dtype)

        arr("backgrounds/latent", (C, h, w), "f4", lat_chunk)
        for n, dt in (("bg_id", "i8"), ("time", "i8"), ("version", "i4"), ("guidance", "i1")):
            arr(f"backgrounds/{n}", (), dt, 4096)
        arr("candidates/latent", (C, h, w), "f4", lat_chunk)
        for n, dt in (("background", "i8"), ("member", "i4"), ("version", "i4")):
            arr(f"candidates/{n}", (), dt, 4096)
        arr("candidates/scores", (K,), "f8", 4096)
        for n, dt in (("winner", "i8"), ("loser", "i8"), ("background", "i8"), ("mode", "u1"),
                      ("version", "i4")):
            arr(f"pairs/{n}", (), dt, 4096)
        arr("pairs/hash", (HASH_BYTES,), "u1", 4096)
        g.attrs.update({"format": FORMAT, "latent_shape": [C, h, w],
                        "reward_names": list(reward_names), "guidance_names": list(GUIDANCES),
                        "meta": dict(meta or {})})
        store = cls(p, g, list(reward_names), (C, h, w))
        store._write_commit({"backgrounds": 0, "candidates": 0, "pairs": 0, "min_version": 0})
        return store

    # ------------------------------------------------------------------ commit bookkeeping
    def _write_commit(self, c: dict) -> None:
        tmp = self.path / f".{_COMMIT}.tmp"
        tmp.write_text(json.dumps(c))
        os.replace(tmp, self.path / _COMMIT)

    @property
    def committed(self) -> dict:
        """``{"backgrounds", "candidates", "pairs", "min_version"}`` of the last commit."""
        return json.loads((self.path / _COMMIT).read_text())

    def _col(self, name: str, n: int | None = None) -> np.ndarray:
        key = name.split("/")[0]
        n = self.committed[key] if n is None else n
        return np.asarray(self.g[name][:n])

    @property
    def num_backgrounds(self) -> int:
        return self.committed["backgrounds"]

    @property
    def num_candidates(self) -> int:
        return self.committed["candidates"]

    @property
    def num_pairs(self) -> int:
        return self.committed["pairs"]

    def done_keys(self) -> set[tuple[int, int, str]]:
        """``(bg_id, version, guidance)`` of every committed background group."""
        if self._keys is None:
            c = self.committed
            names = list(self.g.attrs["guidance_names"])
            ids = self._col("backgrounds/bg_id", c["backgrounds"])
            ver = self._col("backgrounds/version", c["backgrounds"])
            gd = self._col("backgrounds/guidance", c["backgrounds"])
            self._keys = {(int(a), int(b), names[int(g)]) for a, b, g in zip(ids, ver, gd)}
        return self._keys

    def _hash_set(self) -> set[tuple[bytes, int]]:
        if self._hashes is None:
            n = self.num_pairs
            hs = self._col("pairs/hash", n)
            md = self._col("pairs/mode", n)
            self._hashes = {(bytes(h), int(m)) for h, m in zip(hs, md)}
        return self._hashes

    # ------------------------------------------------------------------ writing
    def append(self, groups: Iterable[CandidateGroup]) -> dict:
        """Commit the groups atomically; returns ``{"backgrounds", "candidates", "pairs", "skipped"}``
        added. Groups already committed (same key) and pairs already stored (same hash and mode)
        are skipped."""
        c = self.committed
        keys = self.done_keys()
        hashes = self._hash_set()
        gnames = list(self.g.attrs["guidance_names"])
        bg_rows, cand_rows, pair_rows = [], [], []
        nb, nc = c["backgrounds"], c["candidates"]
        new_keys, new_hashes, skipped = set(), set(), 0
        for grp in groups:
            if grp.key in keys or grp.key in new_keys:
                skipped += 1
                continue
            lat = np.asarray(grp.latents, dtype=np.float32)
            zb = np.asarray(grp.z_b, dtype=np.float32)
            if tuple(lat.shape[1:]) != self.latent_shape or tuple(zb.shape) != self.latent_shape:
                raise InputError(f"candidate latents {lat.shape} / background {zb.shape} do not match "
                                 f"the store's latent shape {self.latent_shape}")
            missing = [k for k in self.reward_names if k not in grp.scores]
            if missing:
                raise InputError(f"candidates lack scores {missing} that the store keeps")
            if grp.guidance not in gnames:
                raise ConfigError(f"unknown guidance {grp.guidance!r}")
            N = lat.shape[0]
            scores = np.stack([np.asarray(grp.scores[k], dtype=np.float64).reshape(N)
                               for k in self.reward_names], axis=1)
            bg_rows.append((zb, grp.bg_id, _ns(grp.time), grp.version, gnames.index(grp.guidance)))
            cand_rows.append((lat, np.full(N, nb), np.arange(N), np.full(N, grp.version), scores))
            for mode, pl in grp.pairs.items():
                if mode not in MODES:
                    raise ConfigError(f"unknown pair mode {mode!r}")
                m = MODES.index(mode)
                for wi, li in np.asarray(pl, dtype=np.int64).reshape(-1, 2):
                    h = pair_hash(zb, lat[wi], lat[li])
                    if (h, m) in hashes or (h, m) in new_hashes:
                        continue
                    new_hashes.add((h, m))
                    pair_rows.append((nc + wi, nc + li, nb, np.frombuffer(h, np.uint8), m,
                                      grp.version))
            new_keys.add(grp.key)
            nb += 1
            nc += N
        if not bg_rows:
            return {"backgrounds": 0, "candidates": 0, "pairs": 0, "skipped": skipped}

        def put(name, start, values):
            a = self.g[name]
            values = np.asarray(values)
            end = start + len(values)
            if a.shape[0] != end:
                a.resize((end, *a.shape[1:]))
            a[start:end] = values

        b0, c0, p0 = c["backgrounds"], c["candidates"], c["pairs"]
        put("backgrounds/latent", b0, np.stack([r[0] for r in bg_rows]))
        put("backgrounds/bg_id", b0, [r[1] for r in bg_rows])
        put("backgrounds/time", b0, [r[2] for r in bg_rows])
        put("backgrounds/version", b0, [r[3] for r in bg_rows])
        put("backgrounds/guidance", b0, [r[4] for r in bg_rows])
        put("candidates/latent", c0, np.concatenate([r[0] for r in cand_rows]))
        put("candidates/background", c0, np.concatenate([r[1] for r in cand_rows]))
        put("candidates/member", c0, np.concatenate([r[2] for r in cand_rows]))
        put("candidates/version", c0, np.concatenate([r[3] for r in cand_rows]))
        put("candidates/scores", c0, np.concatenate([r[4] for r in cand_rows]))
        if pair_rows:
            put("pairs/winner", p0, [r[0] for r in pair_rows])
            put("pairs/loser", p0, [r[1] for r in pair_rows])
            put("pairs/background", p0, [r[2] for r in pair_rows])
            put("pairs/hash", p0, np.stack([r[3] for r in pair_rows]))
            put("pairs/mode", p0, [r[4] for r in pair_rows])
            put("pairs/version", p0, [r[5] for r in pair_rows])
        new = dict(c, backgrounds=nb, candidates=nc, pairs=p0 + len(pair_rows))
        self._write_commit(new)  # the commit point
        keys |= new_keys
        hashes |= new_hashes
        return {"backgrounds": nb - b0, "candidates": nc - c0, "pairs": len(pair_rows),
                "skipped": skipped}

    def drop_stale(self, min_version: int) -> int:
        """Retire pairs (and candidates) of policy versions below ``min_version`` from every
        reader's view (rows stay on disk: the store is append-only). Returns the active pair count."""
        c = self.committed
        c["min_version"] = max(int(min_version), int(c.get("min_version", 0)))
        self._write_commit(c)
        return len(self.pair_set(None))

    # ------------------------------------------------------------------ reading
    def scores(self) -> dict[str, np.ndarray]:
        """Per-candidate scores of the committed candidates: ``{reward: (nc,)}``."""
        s = self._col("candidates/scores")
        return {k: s[:, i] for i, k in enumerate(self.reward_names)}

    def candidate_latents(self, rows: np.ndarray) -> np.ndarray:
        """Latents ``(len(rows), C, h, w)`` of candidate rows."""
        return _take(self.g["candidates/latent"], rows)

    def background_latents(self, rows: np.ndarray) -> np.ndarray:
        """Background latents ``(len(rows), C, h, w)`` of background rows."""
        return _take(self.g["backgrounds/latent"], rows)

    def backgrounds(self) -> dict[str, np.ndarray]:
        """Committed background table: ``bg_id``, ``time`` (datetime64[ns]), ``version``, ``guidance``."""
        n = self.num_backgrounds
        names = list(self.g.attrs["guidance_names"])
        return {"bg_id": self._col("backgrounds/bg_id", n),
                "time": self._col("backgrounds/time", n).astype("datetime64[ns]"),
                "version": self._col("backgrounds/version", n),
                "guidance": np.array([names[int(i)] for i in self._col("backgrounds/guidance", n)])}

    def pair_set(self, mode: str | None = "M", min_version: int | None = None) -> PairSet:
        """The committed pairs of ``mode`` (None: all) with version ≥ ``min_version``
        (default: the store's stale bound)."""
        c = self.committed
        n = c["pairs"]
        mv = c.get("min_version", 0) if min_version is None else int(min_version)
        ver = self._col("pairs/version", n)
        md = self._col("pairs/mode", n)
        keep = ver >= mv
        if mode is not None:
            if mode not in MODES:
                raise ConfigError(f"pair mode {mode!r} is not one of {', '.join(MODES)}")
            keep &= md == MODES.index(mode)
        idx = np.flatnonzero(keep)
        return PairSet(self._col("pairs/winner", n)[idx], self._col("pairs/loser", n)[idx],
                       self._col("pairs/background", n)[idx], ver[idx],
                       self._col("pairs/hash", n)[idx], mode or "all")

    def reselect(self, weights: Mapping[str, float] | None, mode: str = "M",
                 per_background: int = 8, seed: int = 0, top_k: int = 5, decile: float = 0.1,
                 min_version: int | None = None, normalize: str = "zscore") -> PairSet:
        """A new pair set from the STORED per-candidate scores (no sampling, no rollouts).

        Per committed background group: ``select`` by ``mode`` with ``weights``, stratified
        ``pair_up`` (:func:`~align_rl.pairs.pair_rng`, so the same weights and seed give back the pairs
        built with the candidates), dedup by content hash. Not written to the store; hand
        ``(store, pair_set)`` to :class:`PairDataset` or ``run_dpo``.
        """
        c = self.committed
        mv = c.get("min_version", 0) if min_version is None else int(min_version)
        sc = self.scores()
        cb = self._col("candidates/background", c["candidates"])
        bg = self.backgrounds()
        order = np.argsort(cb, kind="stable")
        starts = np.searchsorted(cb[order], np.arange(c["backgrounds"] + 1))
        W, L, B, V, H = [], [], [], [], []
        seen: set[bytes] = set()
        for b in range(c["backgrounds"]):
            if int(bg["version"][b]) < mv:
                continue
            rows = order[starts[b]:starts[b + 1]]
            if len(rows) < 2:
                continue
            s = {k: v[rows] for k, v in sc.items()}
            rng = pair_rng(seed, int(bg["bg_id"][b]), int(bg["version"][b]), mode)
            pl = background_pairs(s, mode, weights, per_background, rng, top_k, decile, normalize)
            if len(pl) == 0:
                continue
            zb = self.background_latents(np.array([b]))[0]
            lat = self.candidate_latents(rows)
            for wi, li in pl:
                h = pair_hash(zb, lat[wi], lat[li])
                if h in seen:
                    continue
                seen.add(h)
                W.append(rows[wi]); L.append(rows[li]); B.append(b)
                V.append(int(bg["version"][b])); H.append(np.frombuffer(h, np.uint8))
        return PairSet(np.asarray(W, np.int64), np.asarray(L, np.int64), np.asarray(B, np.int64),
                       np.asarray(V, np.int32),
                       np.stack(H) if H else np.zeros((0, HASH_BYTES), np.uint8), mode)


def _take(arr, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    uniq, inv = np.unique(rows, return_inverse=True)
    if uniq[-1] - uniq[0] + 1 <= 4 * len(uniq):  # dense: one contiguous read
        block = np.asarray(arr[int(uniq[0]):int(uniq[-1]) + 1])
        return block[rows - uniq[0]]
    return np.asarray(arr.oindex[uniq])[inv]


class PairDataset(torch.utils.data.Dataset):
    """Pairs of a :class:`PairSet` as tensors ``(z_w, z_l, z_b)`` each ``(C, h, w)`` float32.

    ``preload`` (default: when the needed latents take < 1 GiB) reads every latent once;
    otherwise :meth:`batch` reads the rows it needs from the store.
    """

    def __init__(self, store: PairStore | str | Path, pairs: PairSet | None = None,
                 preload: bool | None = None):
        self.store = store if isinstance(store, PairStore) else PairStore.open(store, mode="r")
        self.pairs = pairs if pairs is not None else self.store.pair_set("M")
        if len(self.pairs) == 0:
            raise InputError(f"no preference pairs to train on in {self.store.path}")
        cand = np.unique(np.concatenate([self.pairs.winner, self.pairs.loser]))
        bgs = np.unique(self.pairs.background)
        nbytes = 4 * int(np.prod(self.store.latent_shape)) * (len(cand) + len(bgs))
        self.preloaded = nbytes < (1 << 30) if preload is None else bool(preload)
        if self.preloaded:
            self._cand_rows, self._bg_rows = cand, bgs
            self._cand = torch.from_numpy(self.store.candidate_latents(cand))
            self._bg = torch.from_numpy(self.store.background_latents(bgs))

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, idx: np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_w, z_l, z_b)`` each ``(len(idx), C, h, w)``."""
        idx = np.asarray(idx, dtype=np.int64)
        w, l, b = self.pairs.winner[idx], self.pairs.loser[idx], self.pairs.background[idx]
        if self.preloaded:
            ci = lambda r: torch.from_numpy(np.searchsorted(self._cand_rows, r))  # noqa: E731
            return (self._cand[ci(w)], self._cand[ci(l)],
                    self._bg[torch.from_numpy(np.searchsorted(self._bg_rows, b))])
        return (torch.from_numpy(self.store.candidate_latents(w)),
                torch.from_numpy(self.store.candidate_latents(l)),
                torch.from_numpy(self.store.background_latents(b)))

    def __getitem__(self, i: int):
        zw, zl, zb = self.batch([i])
        return zw[0], zl[0], zb[0]
