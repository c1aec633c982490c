"""Every use of Ray's private or experimental APIs, in one place (for :mod:`align_rl.logs`).

Ray offers no public hook for what the console needs: the driver's printer of the workers' output
(``ray._private.ray_logging.global_worker_stdstream_dispatcher`` and its ``ray_print_logs``
handler, ``ray._private.worker.print_to_stdstream``) and the driver's manager of the workers'
progress bars (``ray.experimental.tqdm_ray``). These are known to work with the Ray versions of
:data:`KNOWN_RAY` (the pin in pyproject.toml; the cluster image runs 2.60); with another version
each function degrades to Ray's own behaviour (workers' output printed by Ray, bars not cleared
around log lines) instead of failing. ``tests/test_logs.py`` checks each hook against the
installed Ray.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

KNOWN_RAY = (">=2.60", "<2.61")
"""The Ray versions these hooks are known to work with (pyproject.toml pins the same)."""

TQDM_MAGIC = "__ray_tqdm_magic_token__"
"""The marker of a worker's progress-bar state line (``ray.experimental.tqdm_ray.RAY_TQDM_MAGIC``)."""

_PRINTER = "ray_print_logs"  # the dispatcher's handler that prints the workers' lines


def bar_manager() -> Any:
    """The driver's manager of the workers' progress bars (``hide_bars``/``unhide_bars``), or
    None when Ray's tqdm is not in use in this process."""
    mod = sys.modules.get("ray.experimental.tqdm_ray")
    mgr = getattr(mod, "_manager", None)
    return mgr if hasattr(mgr, "hide_bars") and hasattr(mgr, "unhide_bars") else None


def apply_bar_state(state: dict) -> None:
    """Draw (or close) a worker's progress bar from one state it sent (a decoded magic line)."""
    from ray.experimental import tqdm_ray

    tqdm_ray.instance().process_state_update(state)


def replace_worker_printer(handler: Callable[[dict], None]) -> bool:
    """Let ``handler(batch)`` receive the workers' output lines instead of Ray's printer (only where
    Ray prints them: a driver connected with ``log_to_driver``). ``batch``: ``{"pid", "ip",
    "lines", "actor_name", "task_name", "localhost", ...}``. Returns whether it was installed."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray version: Ray keeps printing
        return False
    names = [n for n, _ in getattr(dispatcher, "handlers", [])]
    if _PRINTER not in names:
        return False
    dispatcher.remove_handler(_PRINTER)
    dispatcher.add_handler(_PRINTER, handler)
    return True


def print_batch(batch: dict) -> None:
    """Print one batch of a Ray process's lines as Ray itself does (with its ``(pid=…)`` prefix)."""
    try:
        from ray._private.worker import print_to_stdstream
    except ImportError:  # pragma: no cover - another Ray version
        for line in batch.get("lines", []):
            print(line, file=sys.stderr)
        return
    print_to_stdstream(batch, ignore_prefix=False)
