"""The on-disk format of the preference store (:mod:`align_rl.io.pair_store`): layout, the
``COMMIT`` file, content checksums and their checks (docs/method.md §8).

Layout (one zarr v3 group, local path)::

    COMMIT                       JSON {"backgrounds": nb, "candidates": nc, "pairs": np,
                                       "min_version": v} — the only rows readers see
    backgrounds/latent  (nb, C, h, w) f4   standardised background latent z_b
    backgrounds/bg_id   (nb,) i8           id of the background (position in the pref split)
    backgrounds/time    (nb,) i8           analysis time, ns since 1970
    backgrounds/version (nb,) i4           policy version that drew its candidates
    backgrounds/guidance(nb,) i1           index into attrs["guidance_names"] (a list that grows
                                          as a new method's candidates are appended)
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
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from align_rl.errors import InputError, IntegrityError

FORMAT = "align_rl.pairs/2"
FORMATS = ("align_rl.pairs/1", FORMAT)  # /1: before digests (read as is, upgraded on appending)
COMMIT_FILE = "COMMIT"
DIGEST_BYTES = 16
TABLES = ("backgrounds", "candidates", "pairs")
LATENTS = ("backgrounds/latent", "candidates/latent")
_DIGESTS = {"backgrounds/latent": "backgrounds/digest", "candidates/latent": "candidates/digest"}


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

    def ordered(self, key: np.ndarray) -> "PairSet":
        """The same pairs sorted by the rows of ``key`` (P, k) integers (lexicographic, stable)."""
        if len(self) < 2:
            return self
        order = np.lexsort(np.asarray(key).T[::-1])
        return PairSet(self.winner[order], self.loser[order], self.background[order],
                       self.version[order], self.hash[order], self.mode)


COLUMNS: dict[str, tuple[str, ...]] = {
    "backgrounds": ("bg_id", "time", "version", "guidance", "digest"),
    "candidates": ("background", "member", "version", "scores", "digest"),
    "pairs": ("winner", "loser", "background", "hash", "mode", "version"),
}
"""The arrays of each table besides the latents, whose committed rows ``COMMIT`` hashes."""


def row_digests(rows: np.ndarray) -> np.ndarray:
    """``(n, 16)`` uint8: BLAKE2b-128 of each row's float32 bytes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty((len(rows), DIGEST_BYTES), np.uint8)
    for i in range(len(rows)):
        out[i] = np.frombuffer(hashlib.blake2b(rows[i].tobytes(), digest_size=DIGEST_BYTES).digest(),
                               np.uint8)
    return out


def column_digest(values: np.ndarray) -> str:
    """SHA-256 (hex) of an array's dtype, shape and bytes: the checksum of a column in COMMIT."""
    v = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{v.dtype.str}{v.shape}".encode())
    h.update(v.tobytes())
    return h.hexdigest()


def take_rows(arr, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of a zarr array: one contiguous read when they
    are dense, else an orthogonal read of the unique rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    uniq, inv = np.unique(rows, return_inverse=True)
    if uniq[-1] - uniq[0] + 1 <= 4 * len(uniq):  # dense: one contiguous read
        block = np.asarray(arr[int(uniq[0]):int(uniq[-1]) + 1])
        return block[rows - uniq[0]]
    return np.asarray(arr.oindex[uniq])[inv]


class StoreIntegrity:
    """The commit bookkeeping and integrity checks of a :class:`~align_rl.io.pair_store.PairStore`
    (which sets ``path``, ``g`` (the zarr group), ``format`` and ``_verified``)."""

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
                a[s:min(n, s + 1024)] = row_digests(self._read(lat, s, min(n, s + 1024)))
        self.g.attrs["format"] = FORMAT
        self.format = FORMAT
        self._write_commit(self._with_columns(c))
        print(f"align_rl: upgraded the preference store {self.path} to {FORMAT} (content digests)",
              file=sys.stderr)


    # ------------------------------------------------------------------ commit bookkeeping
    def _write_commit(self, c: dict) -> None:
        tmp = self.path / f".{COMMIT_FILE}.tmp"
        tmp.write_text(json.dumps(c))
        os.replace(tmp, self.path / COMMIT_FILE)

    def _commit_text(self) -> str:
        try:
            return (self.path / COMMIT_FILE).read_text()
        except FileNotFoundError:
            raise IntegrityError(
                f"the {COMMIT_FILE} file of the preference store {self.path} is lost; move the store aside "
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
                f"the {COMMIT_FILE} file of the preference store {self.path} is damaged ({text[:80]!r}); "
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
                    f"{COMMIT_FILE} of the preference store {self.path} counts {n} {table} but {name} holds "
                    f"only {have} rows ({COMMIT_FILE} and the data disagree); {fix}"
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
                    raise IntegrityError(f"{COMMIT_FILE} of the preference store {self.path} has no checksum "
                                         f"of {name}; {fix}")
                continue
            if column_digest(values[k]) != want:
                missing = self._missing_chunks(name, n)
                where = f" (chunk file(s) {', '.join(missing[:4])} missing)" if missing else ""
                raise IntegrityError(
                    f"{name} of the preference store {self.path} does not match its checksum in "
                    f"{COMMIT_FILE}{where}: its committed rows 0-{n - 1} are damaged; {fix}"
                )
        limits = {"candidates": {"background": c["backgrounds"]},
                  "pairs": {"winner": c["candidates"], "loser": c["candidates"],
                            "background": c["backgrounds"]},
                  "backgrounds": {"guidance": len(self.g.attrs["guidance_names"])}}[table]
        for k, hi in limits.items():
            v = values.get(k)
            if v is not None and len(v) and (v.min() < 0 or v.max() >= hi):
                raise IntegrityError(f"{table}/{k} of the preference store {self.path} points outside its "
                                     f"table (values {int(v.min())}..{int(v.max())}, {hi} rows); {fix}")
        self._verified[table] = text
        return c

    def verify(self) -> dict:
        """Check every table (backgrounds, candidates, pairs) against ``COMMIT``: arrays, chunk
        files of committed latent rows, column checksums, indices; the committed counts, or
        :class:`~align_rl.errors.IntegrityError` naming the damaged part and the way out. Run
        before a result built from the store (a cached DPO run) is trusted."""
        text = self._commit_text()
        c = self._parse_commit(text)
        for table in TABLES:
            self._verify(table, c, text)
        return c

    def _with_columns(self, c: dict) -> dict:
        """``c`` with the SHA-256 of every column's first ``c[table]`` rows (read back from disk)."""
        cols = {}
        for table in TABLES:
            for k in COLUMNS[table]:
                name = f"{table}/{k}"
                if name in self.g:
                    cols[name] = column_digest(self._read(name, 0, c[table]))
        return dict(c, columns=cols)

    def _col(self, name: str, n: int | None = None) -> np.ndarray:
        table = name.split("/")[0]
        c = self._verify(table)
        n = c[table] if n is None else n
        return self._read(name, 0, n)

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
            out = take_rows(self.g[name], rows)
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode
            raise IntegrityError(f"latent rows of {name} in the preference store {self.path} are "
                                 f"unreadable ({type(exc).__name__}); {fix}") from None
        dig = _DIGESTS[name]
        if rows.size and dig in self.g:
            want = take_rows(self.g[dig], rows)
            bad = np.flatnonzero((row_digests(out) != want).any(axis=1))
            if bad.size:
                missing = self._missing_chunks(name, c[table])
                where = f"; missing chunk file(s): {', '.join(missing[:4])}" if missing else ""
                raise IntegrityError(
                    f"{table} latent row(s) {rows[bad][:5].tolist()} of the preference store {self.path} "
                    f"do not match their stored digests (damaged data{where}); {fix}"
                )
        return out
