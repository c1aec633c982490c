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
- A single file (a checkpoint) is replaced the same way: written as ``new`` inside the marked
  staging folder, then renamed onto the target. So every temporary the project creates lives in a
  folder that holds the marker; nothing else is ever a temporary of ours.
- Staging folders (``.<name>.tmp-<host>-<pid>`` holding the marker) of a process that no longer
  runs on this host are cleaned by the next write of the same target (:func:`clean_stale`) and
  when a command opens the work directory (:func:`clean_tree`, which looks only into the work
  directory itself and folders that are the project's); when the target itself is missing because
  the crash came between the two renames, the old content is moved back first. A file, or an
  unmarked folder, that merely carries such a name is a user's and is never touched; staging names
  of other hosts (a shared workdir) are left alone.
- There is no adoption by content: a folder without the marker (one that looks like a store or an
  evaluation folder included) is never replaced or deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
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


def require_owned(path: str | Path, what: str = "folder") -> None:
    """Raise :class:`OwnershipError` unless the existing folder ``path`` was created by the project
    (its marker). A folder without the marker is refused however much it looks like the project's."""
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


def clean_stale(target: str | Path) -> list[Path]:
    """Remove the staging folders of ``target`` left by dead processes of this host (folders with
    the staging name and the marker; a file or an unmarked folder of that name is left alone);
    restore the old content first when the target is missing. Returns what was removed."""
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
        if e.is_symlink() or not e.is_dir() or not is_owned(e):
            continue  # a user's file or folder that carries a staging name
        old = e / "old"
        if old.exists() and not t.exists() and not t.is_symlink():
            os.replace(old, t)  # the crash came between the two renames: put the old back
        shutil.rmtree(e, ignore_errors=True)
        removed.append(e)
    return removed


def clean_tree(root: str | Path, depth: int = 3) -> list[Path]:
    """:func:`clean_stale` for every staging name found in ``root`` and its subfolders down to
    ``depth`` levels (zarr stores and Ray's, Tune's and wandb's folders are not entered). Only
    marked staging folders are removed: a user's file or folder is never touched, whatever its
    name."""
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
    if work.exists() or work.is_symlink():
        if work.is_symlink() or not work.is_dir() or not is_owned(work):
            raise OwnershipError(f"{work} exists and is not a staging folder of align_rl; it is not "
                                 f"replaced: move it aside to write {t}")
        shutil.rmtree(work)  # ours, of an earlier process that had this pid
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
