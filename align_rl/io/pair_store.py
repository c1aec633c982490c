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
    pairs/hash          (np, 16) u1        content hash of (z_b, z_w, z_l) (align_rl.alignment.pairs.pair_hash)
    pairs/mode          (np,) u1           0 = M, 1 = P
    pairs/version       (np,) i4           policy version of the candidates

    backgrounds/digest  (nb, 16) u1        BLAKE2b-128 of each background latent row (format /2)
    candidates/digest   (nc, 16) u1        BLAKE2b-128 of each candidate latent row (format /2)
    .align_rl                    marker: the folder was created by align_rl (align_rl.owned)

Commits are atomic: :meth:`PairStore.append` writes the rows of a batch past the committed counts,
then replaces ``COMMIT`` (write to a temporary file, ``os.replace``). A crash mid-append leaves
rows past the counts that no reader sees and that the next append overwrites, so a rerun resumes.
Duplicates never enter: a background group already committed with the same ``(bg_id, version,
guidance)`` is skipped, and a pair whose ``(hash, mode)`` is already stored is dropped.
One writer at a time (the driver); any number of readers (learner workers) while it appends.

Integrity (format ``align_rl.pairs/2``): ``COMMIT`` also holds ``columns``, the SHA-256 of the
committed rows of every array except the latents, and every latent row has its own digest. Opening
checks that ``COMMIT`` is readable and consistent (its counts within the arrays, the stored
indices within the tables) and that no chunk file of a committed row is missing; each table's
columns are checked against their SHA-256 the first time the table is read under a commit, and
latent rows against their digests on every read. Damage raises
:class:`~align_rl.errors.IntegrityError` naming the damaged part and the way out: damaged pairs
only (``pairs/*``) are rebuilt from the stored candidate scores by :meth:`PairStore.reselect`;
anything else means moving the store aside and rerunning, which rebuilds it. A lost ``COMMIT`` is
reported, never taken for an empty store, and a folder that is not a preference store is never
written into. Stores of format ``/1`` (no digests) are upgraded when opened for appending.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from align_rl.errors import ConfigError, InputError, IntegrityError
from align_rl.alignment.pairs import HASH_BYTES, MODES, background_pairs, pair_hash, pair_rng

FORMAT = "align_rl.pairs/2"
FORMATS = ("align_rl.pairs/1", FORMAT)  # /1: before digests (read as is, upgraded on appending)
GUIDANCES = ("obsfree", "repaint", "dps")
_COMMIT = "COMMIT"
DIGEST_BYTES = 16
TABLES = ("backgrounds", "candidates", "pairs")
LATENTS = ("backgrounds/latent", "candidates/latent")
_DIGESTS = {"backgrounds/latent": "backgrounds/digest", "candidates/latent": "candidates/digest"}


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


COLUMNS: dict[str, tuple[str, ...]] = {
    "backgrounds": ("bg_id", "time", "version", "guidance", "digest"),
    "candidates": ("background", "member", "version", "scores", "digest"),
    "pairs": ("winner", "loser", "background", "hash", "mode", "version"),
}
"""The arrays of each table besides the latents, whose committed rows ``COMMIT`` hashes."""


def _row_digests(rows: np.ndarray) -> np.ndarray:
    """``(n, 16)`` uint8: BLAKE2b-128 of each row's float32 bytes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty((len(rows), DIGEST_BYTES), np.uint8)
    for i in range(len(rows)):
        out[i] = np.frombuffer(hashlib.blake2b(rows[i].tobytes(), digest_size=DIGEST_BYTES).digest(),
                               np.uint8)
    return out


def _column_digest(values: np.ndarray) -> str:
    v = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{v.dtype.str}{v.shape}".encode())
    h.update(v.tobytes())
    return h.hexdigest()


class PairStore:
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
        from align_rl.owned import is_owned, mark

        p = Path(path)
        if p.exists() and not p.is_dir():
            raise InputError(f"{p} is a file, not a preference store; point pairs.store at a new folder")
        empty = not p.exists() or not any(p.iterdir())
        if empty:
            if mode == "r":
                raise InputError(f"no preference store at {p}; build pairs first (python -m align_rl.train)")
            return cls._create(p, latent_shape, reward_names, meta)
        has_meta = (p / "zarr.json").exists() or (p / ".zgroup").exists()
        if not has_meta and not (p / _COMMIT).exists():
            raise InputError(
                f"{p} is not an align_rl preference store (no zarr metadata, no {_COMMIT}); nothing "
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
            if len(ls) != 3 or min(ls) < 1 or not names or not gnames:
                raise ValueError("out of range")
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(
                f"the metadata of the preference store {p} is damaged (latent_shape, reward_names or "
                f"guidance_names: {exc}); move the store aside (mv {p} {p}.damaged) and rerun to rebuild it"
            ) from None
        if not (p / _COMMIT).exists():
            raise IntegrityError(
                f"the {_COMMIT} file of the preference store {p} is lost, so which rows were committed "
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

        from align_rl.owned import mark

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
                        "reward_names": list(reward_names), "guidance_names": list(GUIDANCES),
                        "meta": dict(meta or {})})
        store = cls(p, g, list(reward_names), (C, h, w))
        store._write_commit(store._with_columns({"backgrounds": 0, "candidates": 0, "pairs": 0,
                                                 "min_version": 0}))
        return store

    def _upgrade(self) -> None:
        """Format /1 -> /2: digests of the committed latent rows and the column hashes in COMMIT."""
        c = self.committed
        for lat, dig in _DIGESTS.items():
            n = c[lat.split("/")[0]]
            if dig not in self.g:
                self.g.create_array(dig, shape=(0, DIGEST_BYTES), chunks=(4096, DIGEST_BYTES), dtype="u1")
            a = self._w(dig)
            a.resize((n, DIGEST_BYTES))
            for s in range(0, n, 1024):
                a[s:min(n, s + 1024)] = _row_digests(self._read(lat, s, min(n, s + 1024)))
        self.g.attrs["format"] = FORMAT
        self.format = FORMAT
        self._write_commit(self._with_columns(c))
        print(f"align_rl: upgraded the preference store {self.path} to {FORMAT} (content digests)",
              file=sys.stderr)

    # ------------------------------------------------------------------ commit bookkeeping
    def _write_commit(self, c: dict) -> None:
        tmp = self.path / f".{_COMMIT}.tmp"
        tmp.write_text(json.dumps(c))
        os.replace(tmp, self.path / _COMMIT)

    def _commit_text(self) -> str:
        try:
            return (self.path / _COMMIT).read_text()
        except FileNotFoundError:
            raise IntegrityError(
                f"the {_COMMIT} file of the preference store {self.path} is lost; move the store aside "
                f"(mv {self.path} {self.path}.damaged) and rerun the command to rebuild it"
            ) from None

    def _parse_commit(self, text: str) -> dict:
        try:
            c = json.loads(text)
            ok = isinstance(c, dict) and all(
                isinstance(c.get(k), int) and not isinstance(c.get(k), bool) and c[k] >= 0
                for k in (*TABLES, "min_version"))
            ok = ok and isinstance(c.get("columns", {}), dict)
        except ValueError:
            ok = False
        if not ok:
            raise IntegrityError(
                f"the {_COMMIT} file of the preference store {self.path} is damaged ({text[:80]!r}); "
                f"move the store aside (mv {self.path} {self.path}.damaged) and rerun to rebuild it"
            )
        return c

    @property
    def committed(self) -> dict:
        """``{"backgrounds", "candidates", "pairs", "min_version", "columns"}`` of the last commit
        (``columns``: SHA-256 of each array's committed rows)."""
        return self._parse_commit(self._commit_text())

    def _recovery(self, table: str) -> str:
        aside = f"mv {self.path} {self.path}.damaged"
        if table == "pairs":
            return ("the candidates and their scores are intact, so PairStore.reselect(weights, mode) "
                    f"gives pairs again without sampling; or move the store aside ({aside}) and rerun "
                    "the command to rebuild it")
        return f"move the store aside ({aside}) and rerun the command: it rebuilds the store"

    def _w(self, name: str):
        """Array ``name`` for writing (every chunk written, even one of zeros, so that a missing
        chunk file always means damage)."""
        return self.g[name].with_config({"write_empty_chunks": True})

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self.g[name][start:stop])
        except KeyError:
            raise IntegrityError(f"the array {name} of the preference store {self.path} is missing; "
                                 f"{self._recovery(name.split('/')[0])}") from None
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode
            raise IntegrityError(
                f"rows {start}-{stop - 1} of {name} in the preference store {self.path} are unreadable "
                f"({type(exc).__name__}); {self._recovery(name.split('/')[0])}"
            ) from None

    def _missing_chunks(self, name: str, n: int) -> list[str]:
        """Chunk files of ``name`` that hold committed rows (< ``n``) and are not on disk."""
        import itertools

        a = self.g[name]
        rows = int(a.chunks[0])
        rest = [range(math.ceil(s / c)) for s, c in zip(a.shape[1:], a.chunks[1:])]
        out = []
        for i in range(math.ceil(n / rows)):
            for tail in itertools.product(*rest):
                key = a.metadata.encode_chunk_key((i, *tail))
                if not (self.path / name / key).exists():
                    out.append(f"{name}/{key}")
        return out

    def _verify(self, table: str, c: dict | None = None, text: str | None = None) -> dict:
        """Check ``table`` against the commit (once per commit): the arrays exist and hold the
        committed rows, no chunk file of a committed latent row is missing, every column matches
        its SHA-256 in COMMIT and every stored index points into its table."""
        if text is None:
            text = self._commit_text()
        if c is None:
            c = self._parse_commit(text)
        if self._verified.get(table) == text:
            return c
        n = c[table]
        fix = self._recovery(table)
        lat = f"{table}/latent" if table != "pairs" else None
        names = [f"{table}/{k}" for k in COLUMNS[table]] + ([lat] if lat else [])
        for name in names:
            if name not in self.g:
                if name.endswith("/digest") and self.format != FORMAT:
                    continue  # format /1
                raise IntegrityError(f"the array {name} of the preference store {self.path} is missing; {fix}")
            have = self.g[name].shape[0]
            if have < n:
                raise IntegrityError(
                    f"{_COMMIT} of the preference store {self.path} counts {n} {table} but {name} holds "
                    f"only {have} rows ({_COMMIT} and the data disagree); {fix}"
                )
        if lat:
            missing = self._missing_chunks(lat, n)
            if missing:
                raise IntegrityError(
                    f"chunk file(s) {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''} of committed "
                    f"rows are missing from the preference store {self.path}; {fix}"
                )
        hashes = c.get("columns", {})
        values: dict[str, np.ndarray] = {}
        for k in COLUMNS[table]:
            name = f"{table}/{k}"
            if name not in self.g:
                continue
            values[k] = self._read(name, 0, n)
            want = hashes.get(name)
            if want is None:
                if self.format == FORMAT:
                    raise IntegrityError(f"{_COMMIT} of the preference store {self.path} has no checksum "
                                         f"of {name}; {fix}")
                continue
            if _column_digest(values[k]) != want:
                missing = self._missing_chunks(name, n)
                where = f" (chunk file(s) {', '.join(missing[:4])} missing)" if missing else ""
                raise IntegrityError(
                    f"{name} of the preference store {self.path} does not match its checksum in "
                    f"{_COMMIT}{where}: its committed rows 0-{n - 1} are damaged; {fix}"
                )
        limits = {"candidates": {"background": c["backgrounds"]},
                  "pairs": {"winner": c["candidates"], "loser": c["candidates"],
                            "background": c["backgrounds"]},
                  "backgrounds": {"guidance": len(GUIDANCES)}}[table]
        for k, hi in limits.items():
            v = values.get(k)
            if v is not None and len(v) and (v.min() < 0 or v.max() >= hi):
                raise IntegrityError(f"{table}/{k} of the preference store {self.path} points outside its "
                                     f"table (values {int(v.min())}..{int(v.max())}, {hi} rows); {fix}")
        self._verified[table] = text
        return c

    def _with_columns(self, c: dict) -> dict:
        """``c`` with the SHA-256 of every column's first ``c[table]`` rows (read back from disk)."""
        cols = {}
        for table in TABLES:
            for k in COLUMNS[table]:
                name = f"{table}/{k}"
                if name in self.g:
                    cols[name] = _column_digest(self._read(name, 0, c[table]))
        return dict(c, columns=cols)

    def _col(self, name: str, n: int | None = None) -> np.ndarray:
        table = name.split("/")[0]
        c = self._verify(table)
        n = c[table] if n is None else n
        return self._read(name, 0, n)

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
            a = self._w(name)
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
        put("backgrounds/digest", b0, _row_digests(np.stack([r[0] for r in bg_rows])))
        put("candidates/latent", c0, np.concatenate([r[0] for r in cand_rows]))
        put("candidates/digest", c0, _row_digests(np.concatenate([r[0] for r in cand_rows])))
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
        """Background row of every committed candidate ``(nc,)``."""
        return self._col("candidates/background")

    def _latents(self, table: str, rows: np.ndarray) -> np.ndarray:
        """Latent rows of ``table``, each checked against its stored digest."""
        c = self._verify(table)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= c[table]):
            raise InputError(f"{table} rows {int(rows.min())}..{int(rows.max())} are outside the "
                             f"{c[table]} committed rows of the preference store {self.path}")
        name = f"{table}/latent"
        fix = self._recovery(table)
        try:
            out = _take(self.g[name], rows)
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode
            raise IntegrityError(f"latent rows of {name} in the preference store {self.path} are "
                                 f"unreadable ({type(exc).__name__}); {fix}") from None
        dig = _DIGESTS[name]
        if rows.size and dig in self.g:
            want = _take(self.g[dig], rows)
            bad = np.flatnonzero((_row_digests(out) != want).any(axis=1))
            if bad.size:
                missing = self._missing_chunks(name, c[table])
                where = f"; missing chunk file(s): {', '.join(missing[:4])}" if missing else ""
                raise IntegrityError(
                    f"{table} latent row(s) {rows[bad][:5].tolist()} of the preference store {self.path} "
                    f"do not match their stored digests (damaged data{where}); {fix}"
                )
        return out

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
        return PairSet(self._col("pairs/winner", n)[idx], self._col("pairs/loser", n)[idx],
                       self._col("pairs/background", n)[idx], ver[idx],
                       self._col("pairs/hash", n)[idx], mode or "all")

    def reselect(self, weights: Mapping[str, float] | None, mode: str = "M",
                 per_background: int = 8, seed: int = 0, top_k: int = 5, decile: float = 0.1,
                 min_version: int | None = None, normalize: str = "zscore") -> PairSet:
        """A new pair set from the STORED per-candidate scores (no sampling, no rollouts).

        Per committed background group: ``select`` by ``mode`` with ``weights``, stratified
        ``pair_up`` (:func:`~align_rl.alignment.pairs.pair_rng`, so the same weights and seed give back the pairs
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
