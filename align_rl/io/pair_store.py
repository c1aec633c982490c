"""Append-only zarr preference store: backgrounds, scored candidates and pairs (docs/method.md §8).

The layout, the ``COMMIT`` file and the checksums are described in :mod:`align_rl.io.pair_format`;
new pairs from the stored scores come from :func:`align_rl.alignment.reselect.reselect_pairs`.

Commits are atomic: :meth:`PairStore.append` writes the rows of a batch past the committed counts,
then replaces ``COMMIT`` (write to a temporary file, ``os.replace``). A crash mid-append leaves
rows past the counts that no reader sees and that the next append overwrites, so a rerun resumes.
Duplicates never enter: a background group already committed with the same ``(bg_id, version,
guidance)`` is skipped, and a pair whose ``(hash, mode)`` is already stored is dropped.
One writer at a time (the driver); any number of readers (learner workers) while it appends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from align_rl.alignment.pairs import HASH_BYTES, MODES, pair_hash
from align_rl.alignment.reselect import reselect_pairs
from align_rl.errors import ConfigError, InputError, IntegrityError
from align_rl.io.pair_format import (
    COMMIT_FILE,
    DIGEST_BYTES,
    FORMAT,
    FORMATS,
    TABLES,
    PairSet,
    StoreIntegrity,
    row_digests,
)
from align_rl.owned import is_owned, mark

__all__ = ["CandidateGroup", "FORMAT", "PairDataset", "PairSet", "PairStore"]


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


def _ns(t) -> int:
    if isinstance(t, (int, np.integer)):
        return int(t)
    return int(np.datetime64(t, "ns").astype(np.int64))


class PairStore(StoreIntegrity):
    """The preference store at ``path`` (created on first :meth:`open` with ``latent_shape``)."""

    def __init__(self, path: str | Path, group, reward_names: list[str], latent_shape: tuple,
                 fmt: str = FORMAT):
        self.path = Path(path)
        self.g = group
        self.reward_names = list(reward_names)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.format = fmt
        self._hashes: set[tuple[bytes, int]] | None = None
        self._keys: set[tuple[int, int, str]] | None = None
        self._verified: dict[str, str] = {}  # table -> COMMIT text it was verified under

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _open_group(p: Path, mode: str):
        import zarr

        try:
            g = zarr.open_group(str(p), mode="r" if mode == "r" else "a")
            attrs = dict(g.attrs)
        except Exception as exc:  # noqa: BLE001 - garbage metadata, unreadable folder, ...
            raise IntegrityError(
                f"the metadata of the preference store {p} (zarr.json) is unreadable "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); move the store "
                f"aside (mv {p} {p}.damaged) and rerun the command to rebuild it"
            ) from None
        return g, attrs

    @classmethod
    def open(cls, path: str | Path, latent_shape: Sequence[int] | None = None,
             reward_names: Sequence[str] | None = None, meta: Mapping | None = None,
             mode: str = "a") -> "PairStore":
        """Open (``mode="r"``) or open-or-create (``"a"``) the store.

        Creating needs ``latent_shape`` (C, h, w) and ``reward_names``. ``meta`` (e.g. the data
        and reference-model identity) is stored on creation and must match on reopening. A folder
        that is not a preference store is refused before anything is written into it; a damaged
        store raises :class:`IntegrityError` (module doc).
        """

        p = Path(path)
        if p.exists() and not p.is_dir():
            raise InputError(f"{p} is a file, not a preference store; point pairs.store at a new folder")
        empty = not p.exists() or not any(p.iterdir())
        if empty:
            if mode == "r":
                raise InputError(f"no preference store at {p}; build pairs first (python -m align_rl.train)")
            return cls._create(p, latent_shape, reward_names, meta)
        has_meta = (p / "zarr.json").exists() or (p / ".zgroup").exists()
        if not has_meta and not (p / COMMIT_FILE).exists():
            raise InputError(
                f"{p} is not an align_rl preference store (no zarr metadata, no {COMMIT_FILE}); nothing "
                "was written to it: point pairs.store at a new or empty folder"
            )
        g, attrs = cls._open_group(p, mode)
        fmt = attrs.get("format")
        if fmt not in FORMATS:
            if str(fmt).startswith("align_rl.pairs/"):
                raise IntegrityError(f"preference store {p} has format {fmt!r}; this code reads "
                                     f"{', '.join(FORMATS)}: rebuild it with this version (move it aside)")
            raise InputError(
                f"{p} is not an align_rl preference store (format {fmt!r}); nothing was written to "
                "it: point pairs.store at a new or empty folder"
            )
        try:
            ls = tuple(int(v) for v in attrs["latent_shape"])
            names = [str(v) for v in attrs["reward_names"]]
            gnames = [str(v) for v in attrs["guidance_names"]]
            if len(ls) != 3 or min(ls) < 1 or not names or not all(gnames):
                raise ValueError("out of range")
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(
                f"the metadata of the preference store {p} is damaged (latent_shape, reward_names or "
                f"guidance_names: {exc}); move the store aside (mv {p} {p}.damaged) and rerun to rebuild it"
            ) from None
        if not (p / COMMIT_FILE).exists():
            raise IntegrityError(
                f"the {COMMIT_FILE} file of the preference store {p} is lost, so which rows were committed "
                f"is unknown (the store is not taken for empty); move the store aside "
                f"(mv {p} {p}.damaged) and rerun the command to rebuild it"
            )
        if latent_shape is not None and tuple(int(v) for v in latent_shape) != ls:
            raise InputError(f"preference store {p} holds latents {ls}, not {tuple(latent_shape)}; "
                             "use another pairs.store or delete it")
        if reward_names is not None and list(reward_names) != names:
            raise ConfigError(f"preference store {p} was scored with rewards {names}, the config "
                              f"asks for {list(reward_names)}; use another pairs.store")
        if meta is not None:
            old = attrs.get("meta", {})
            old = old if isinstance(old, dict) else {}
            diff = {k: (old.get(k), v) for k, v in dict(meta).items() if old.get(k) != v}
            if diff:
                raise InputError(f"preference store {p} was built for other inputs {diff}; "
                                 "use another pairs.store or delete it")
        store = cls(p, g, names, ls, fmt)
        store._verify("backgrounds")
        store._verify("candidates")
        if mode != "r":
            if fmt != FORMAT:
                store._upgrade()
            if not is_owned(p):
                mark(p, "pairs")
        return store

    @classmethod
    def _create(cls, p: Path, latent_shape, reward_names, meta) -> "PairStore":
        import zarr

        if latent_shape is None or reward_names is None:
            raise InputError(f"creating the preference store {p} needs latent_shape and reward_names")
        p.mkdir(parents=True, exist_ok=True)
        mark(p, "pairs")
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
        arr("backgrounds/digest", (DIGEST_BYTES,), "u1", 4096)
        arr("candidates/latent", (C, h, w), "f4", lat_chunk)
        for n, dt in (("background", "i8"), ("member", "i4"), ("version", "i4")):
            arr(f"candidates/{n}", (), dt, 4096)
        arr("candidates/scores", (K,), "f8", 4096)
        arr("candidates/digest", (DIGEST_BYTES,), "u1", 4096)
        for n, dt in (("winner", "i8"), ("loser", "i8"), ("background", "i8"), ("mode", "u1"),
                      ("version", "i4")):
            arr(f"pairs/{n}", (), dt, 4096)
        arr("pairs/hash", (HASH_BYTES,), "u1", 4096)
        g.attrs.update({"format": FORMAT, "latent_shape": [C, h, w],
                        "reward_names": list(reward_names), "guidance_names": [],
                        "meta": dict(meta or {})})
        store = cls(p, g, list(reward_names), (C, h, w))
        store._write_commit(store._with_columns({"backgrounds": 0, "candidates": 0, "pairs": 0,
                                                 "min_version": 0}))
        return store

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
    def _group_rows(self, grp: CandidateGroup, nb: int, nc: int, gnames: list[str],
                    seen: set[tuple[bytes, int]], new_hashes: set[tuple[bytes, int]]):
        """The rows of one group placed at background row ``nb`` and candidate row ``nc``:
        ``(background row, candidate rows, pair rows)``; pairs already stored or already in this
        batch (``seen``, ``new_hashes``, which it extends) are left out."""
        lat = np.asarray(grp.latents, dtype=np.float32)
        zb = np.asarray(grp.z_b, dtype=np.float32)
        if tuple(lat.shape[1:]) != self.latent_shape or tuple(zb.shape) != self.latent_shape:
            raise InputError(f"candidate latents {lat.shape} / background {zb.shape} do not match "
                             f"the store's latent shape {self.latent_shape}")
        missing = [k for k in self.reward_names if k not in grp.scores]
        if missing:
            raise InputError(f"candidates lack scores {missing} that the store keeps")
        if not grp.guidance or not isinstance(grp.guidance, str):
            raise ConfigError(f"candidates name no guidance method ({grp.guidance!r})")
        if grp.guidance not in gnames:  # a method first stored now: its index is the next one
            gnames.append(grp.guidance)
        N = lat.shape[0]
        scores = np.stack([np.asarray(grp.scores[k], dtype=np.float64).reshape(N)
                           for k in self.reward_names], axis=1)
        bg_row = (zb, grp.bg_id, _ns(grp.time), grp.version, gnames.index(grp.guidance))
        cand_row = (lat, np.full(N, nb), np.arange(N), np.full(N, grp.version), scores)
        pair_rows = []
        for mode, pl in grp.pairs.items():
            if mode not in MODES:
                raise ConfigError(f"unknown pair mode {mode!r}")
            m = MODES.index(mode)
            for wi, li in np.asarray(pl, dtype=np.int64).reshape(-1, 2):
                h = pair_hash(zb, lat[wi], lat[li])
                if (h, m) in seen or (h, m) in new_hashes:
                    continue
                new_hashes.add((h, m))
                pair_rows.append((nc + wi, nc + li, nb, np.frombuffer(h, np.uint8), m, grp.version))
        return bg_row, cand_row, pair_rows

    def _put(self, name: str, start: int, values) -> None:
        """Write ``values`` as rows ``start…`` of array ``name`` (resized to end there)."""
        a = self._w(name)
        values = np.asarray(values)
        end = start + len(values)
        if a.shape[0] != end:
            a.resize((end, *a.shape[1:]))
        a[start:end] = values

    def _write_rows(self, c: dict, bg_rows: list, cand_rows: list, pair_rows: list) -> None:
        """Write the rows of a batch past the committed counts ``c`` (not yet committed)."""
        b0, c0, p0 = c["backgrounds"], c["candidates"], c["pairs"]
        put = self._put
        put("backgrounds/latent", b0, np.stack([r[0] for r in bg_rows]))
        put("backgrounds/bg_id", b0, [r[1] for r in bg_rows])
        put("backgrounds/time", b0, [r[2] for r in bg_rows])
        put("backgrounds/version", b0, [r[3] for r in bg_rows])
        put("backgrounds/guidance", b0, [r[4] for r in bg_rows])
        put("backgrounds/digest", b0, row_digests(np.stack([r[0] for r in bg_rows])))
        put("candidates/latent", c0, np.concatenate([r[0] for r in cand_rows]))
        put("candidates/digest", c0, row_digests(np.concatenate([r[0] for r in cand_rows])))
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
            bg_row, cand_row, pairs = self._group_rows(grp, nb, nc, gnames, hashes, new_hashes)
            bg_rows.append(bg_row)
            cand_rows.append(cand_row)
            pair_rows.extend(pairs)
            new_keys.add(grp.key)
            nb += 1
            nc += len(cand_row[1])
        if not bg_rows:
            return {"backgrounds": 0, "candidates": 0, "pairs": 0, "skipped": skipped}
        if len(gnames) != len(self.g.attrs["guidance_names"]):
            self.g.attrs["guidance_names"] = gnames  # before the rows that point into it
        self._write_rows(c, bg_rows, cand_rows, pair_rows)
        b0, c0, p0 = c["backgrounds"], c["candidates"], c["pairs"]
        new = self._with_columns(dict(c, backgrounds=nb, candidates=nc, pairs=p0 + len(pair_rows)))
        self._write_commit(new)  # the commit point
        self._verified = {t: json.dumps(new) for t in TABLES}  # hashed from what was read back
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

    def candidate_backgrounds(self) -> np.ndarray:
        """``(nc,)`` int64: the background row of every committed candidate."""
        return self._col("candidates/background")

    def candidate_latents(self, rows: np.ndarray) -> np.ndarray:
        """Latents ``(len(rows), C, h, w)`` of candidate rows (digests checked)."""
        return self._latents("candidates", rows)

    def background_latents(self, rows: np.ndarray) -> np.ndarray:
        """Background latents ``(len(rows), C, h, w)`` of background rows (digests checked)."""
        return self._latents("backgrounds", rows)

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
        ps = PairSet(self._col("pairs/winner", n)[idx], self._col("pairs/loser", n)[idx],
                     self._col("pairs/background", n)[idx], ver[idx],
                     self._col("pairs/hash", n)[idx], mode or "all")
        return self.in_task_order(ps)

    def in_task_order(self, ps: PairSet) -> PairSet:
        """``ps`` ordered by what each pair is, not by store row: background id, policy version,
        guidance, winner's and loser's member index. Sampler actors commit backgrounds in the order they
        finish, so the rows of the same pairs differ from run to run; ordered so, the same pairs
        give the learner the same batches (same seed)."""
        if len(ps) < 2:
            return ps
        nb = self.num_backgrounds
        bg_id = self._col("backgrounds/bg_id", nb)[ps.background]
        guidance = self._col("backgrounds/guidance", nb)[ps.background]
        member = self._col("candidates/member", self.num_candidates)
        return ps.ordered(np.stack([bg_id, ps.version, guidance, member[ps.winner],
                                    member[ps.loser]], 1).astype(np.int64))

    def reselect(self, weights: Mapping[str, float] | None, mode: str = "M",
                 per_background: int = 8, seed: int = 0, top_k: int = 5, decile: float = 0.1,
                 min_version: int | None = None, normalize: str = "zscore",
                 bg_ids: Any = None) -> PairSet:
        """A new pair set from the STORED per-candidate scores (no sampling, no rollouts):
        :func:`align_rl.alignment.reselect.reselect_pairs` of this store (only the backgrounds
        ``bg_ids`` when given)."""
        return reselect_pairs(self, weights, mode, per_background, seed, top_k, decile,
                              min_version, normalize, bg_ids)


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
