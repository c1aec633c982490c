"""What the project created, and how it replaces or removes it without losing anything else.

Rules (docs/design.md, "Hardening"):

- Every folder the project writes as a whole (zarr stores written by :func:`align_rl.io.store.write_states`,
  the evaluation folder, preference stores) holds the marker file :data:`MARKER`. A folder is only
  replaced or deleted when its marker says the project created it (:func:`require_owned`); anything
  else raises :class:`~align_rl.errors.OwnershipError` before any work.
- A replacement is atomic (:func:`staged`): the new content is written inside a staging folder
  ``.<name>.tmp-<host>-<pid>`` beside the target (the staging folder holds the marker from its first
  moment), then the old target is renamed aside into the staging folder, the new one renamed into
  place, and only then the staging folder, holding the old content, is removed. A crash at any
  point leaves the old target, or the new one, in place.
- Staging folders and temporary files (``.<name>.tmp-<host>-<pid>``, :func:`temp_file`) of a process
  that no longer runs on this host are cleaned by the next write of the same target
  (:func:`clean_stale`) and when a command opens the work directory (:func:`clean_tree`); when the target itself is missing because the crash came between the two
  renames, the old content is moved back first. Staging names of other hosts (a shared workdir)
  are left alone.
- Folders written before markers existed are recognised once by their content (a zarr store of
  :func:`~align_rl.io.store.write_states`, an evaluation folder, a preference store) and adopted: the
  marker is written and the rule above applies from then on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from align_rl.errors import InputError, OwnershipError

MARKER = ".align_rl"
"""Name of the marker file inside every folder the project created."""

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_STAGE_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)$")


# ----------------------------------------------------------------------------- markers


def mark(path: str | Path, kind: str) -> Path:
    """Write the marker into the folder ``path`` (which must exist)."""
    p = Path(path)
    (p / MARKER).write_text(json.dumps({"created_by": "align_rl", "kind": kind}) + "\n")
    return p


def is_owned(path: str | Path) -> bool:
    """Whether the folder ``path`` holds the project's marker."""
    return (Path(path) / MARKER).is_file()


def _zarr_meta(p: Path) -> dict:
    for name in ("zarr.json", ".zmetadata", ".zattrs"):
        f = p / name
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
    return {}


def legacy_kind(path: str | Path) -> str | None:
    """The kind of a folder written by the project before markers existed, from its content:
    ``states`` (a zarr of ``write_states``: variables with ``short_name`` and ``derived``
    attributes), ``pairs`` (a preference store: format ``align_rl.pairs/…``), ``eval`` (an
    evaluation folder: ``report.md`` and a ``metrics.json`` with checks); None otherwise."""
    p = Path(path)
    if not p.is_dir():
        return None
    meta = _zarr_meta(p)
    attrs = meta.get("attributes", meta) if isinstance(meta, dict) else {}
    if isinstance(attrs, dict) and str(attrs.get("format", "")).startswith("align_rl.pairs/"):
        return "pairs"
    cm = meta.get("consolidated_metadata", {}) if isinstance(meta, dict) else {}
    entries = (cm or {}).get("metadata", {}) if isinstance(cm, dict) else {}
    if not entries and isinstance(meta, dict) and "metadata" in meta:  # zarr v2 .zmetadata
        entries = meta["metadata"]
    for v in (entries or {}).values():
        a = v.get("attributes", v) if isinstance(v, dict) else {}
        if isinstance(a, dict) and "short_name" in a and "derived" in a:
            return "states"
    if (p / "report.md").is_file() and (p / "metrics.json").is_file():
        try:
            if "checks" in json.loads((p / "metrics.json").read_text()):
                return "eval"
        except (OSError, ValueError):
            pass
    return None


def require_owned(path: str | Path, what: str = "folder") -> None:
    """Raise :class:`OwnershipError` unless the existing folder ``path`` was created by the project
    (marker, or a recognised folder from before markers, which is adopted)."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_dir():
        raise OwnershipError(
            f"{p} exists and is not a folder written by align_rl (a {'link' if p.is_symlink() else 'file'}); "
            f"it is not replaced: choose another path for the {what} or move it aside yourself"
        )
    if is_owned(p):
        return
    kind = legacy_kind(p)
    if kind is not None:
        mark(p, kind)
        print(f"align_rl: {p} is a {kind} folder written before ownership markers; marked as ours",
              file=sys.stderr)
        return
    raise OwnershipError(
        f"{p} exists but was not created by align_rl (no {MARKER} marker inside), so it is not "
        f"replaced or deleted; choose another path for the {what} or move it aside yourself"
    )


def remove_owned(path: str | Path, what: str = "folder") -> None:
    """Delete the folder ``path`` if it exists and the project created it (else OwnershipError)."""
    p = Path(path)
    if not p.exists():
        return
    require_owned(p, what)
    shutil.rmtree(p)


# ----------------------------------------------------------------------------- staging


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_path(target: str | Path) -> Path:
    """``.<name>.tmp-<host>-<pid>`` beside ``target``: this process's staging name for it."""
    t = Path(target)
    return t.with_name(f".{t.name}.tmp-{_HOST}-{os.getpid()}")


def temp_file(target: str | Path) -> Path:
    """A temporary file name beside ``target`` (write it, then ``os.replace`` it onto ``target``);
    :func:`clean_stale` removes it if this process dies before."""
    clean_stale(target)
    return staging_path(target)


def clean_stale(target: str | Path) -> list[Path]:
    """Remove staging folders and temporary files of ``target`` left by dead processes of this
    host; restore the old content first when the target is missing. Returns what was removed."""
    t = Path(target)
    parent = t.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = _STAGE_RE.match(e.name)
        if not m or m["name"] != t.name or m["host"] != _HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if e.is_dir() and not e.is_symlink():
            if not is_owned(e):
                continue  # not a staging folder of ours
            old = e / "old"
            if old.exists() and not t.exists() and not t.is_symlink():
                os.replace(old, t)  # the crash came between the two renames: put the old back
            shutil.rmtree(e, ignore_errors=True)
        else:
            try:
                e.unlink()
            except OSError:
                continue
        removed.append(e)
    return removed


def clean_tree(root: str | Path, depth: int = 3) -> list[Path]:
    """:func:`clean_stale` for every staging name found in ``root`` and its subfolders down to
    ``depth`` levels (zarr stores and Ray's, Tune's and wandb's folders are not entered)."""
    removed: list[Path] = []
    r = Path(root)
    if depth < 0 or not r.is_dir():
        return removed
    try:
        entries = list(r.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = _STAGE_RE.match(e.name)
        if m:
            removed += clean_stale(r / m["name"])
        elif (e.is_dir() and not e.is_symlink() and not e.name.endswith(".zarr")
              and e.name not in ("ray", "tune", "wandb")):
            removed += clean_tree(e, depth - 1)
    return removed


@contextmanager
def staged(target: str | Path, kind: str, overwrite: bool = True) -> Iterator[Path]:
    """Write a new ``target`` atomically: ``with staged(path, "states") as new: write(new)``.

    ``new`` (a path that does not exist yet) is where the caller writes the new folder or file.
    On leaving the block without an error the new content replaces ``target`` (old renamed aside,
    new renamed in, old removed); a folder gets the marker of ``kind``. An existing folder target
    must be ours (:func:`require_owned`, checked before the block runs); ``overwrite=False``
    refuses an existing target.
    """

    t = Path(target)
    clean_stale(t)
    if t.exists() or t.is_symlink():
        if not overwrite:
            raise InputError(f"{t} exists; remove it or pass --overwrite")
        if t.is_dir() or t.is_symlink():
            require_owned(t, kind)
    t.parent.mkdir(parents=True, exist_ok=True)
    work = staging_path(t)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    mark(work, "staging")
    new = work / "new"
    try:
        yield new
        if not new.exists():
            raise FileNotFoundError(f"nothing was written for {t}")
        if new.is_dir():
            mark(new, kind)
            old = None
            if t.exists() or t.is_symlink():
                old = work / "old"
                os.replace(t, old)  # aside (inside the marked staging folder)
            try:
                os.replace(new, t)
            except BaseException:
                if old is not None and not t.exists():
                    os.replace(old, t)
                raise
        else:
            if t.is_dir():
                raise OwnershipError(f"{t} is a folder; it is not replaced by a file")
            os.replace(new, t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
