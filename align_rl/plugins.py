"""Users' own code: the modules of ``run.plugins``, imported in every process before its work.

A plugin is an importable module (``my_package.my_rewards``) that registers what it adds when it
is imported: rewards (:func:`align_rl.alignment.rewards.register_reward`), guidance methods
(:func:`align_rl.diffusion.guidance.register_guidance`) and forecaster kinds
(:func:`align_rl.models.loading.register_forecaster_kind`); the config then accepts their names
(docs/method.md §11). :func:`load` runs in :func:`align_rl.config.validate`, so the driver, every
Ray actor and every Ray Train worker (each rebuilds the config with
:func:`~align_rl.config.config_from_dict`) imports the plugins before it checks a name or starts
work. The module must be importable in each of those processes: installed, on ``PYTHONPATH``
(Ray's workers inherit the environment of the process that started Ray), or shipped with Ray's
runtime environment (``py_modules``) on a cluster.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Iterable

from align_rl.errors import ConfigError

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
"""A dotted module name (``pkg.mod``), not a file path."""

_loaded: list[str] = []


def load(names: Iterable[str]) -> list[str]:
    """Import each module of ``names`` once in this process (in order); returns the names.
    Raises :class:`ConfigError` naming the module and the fix when one is not a module name or
    cannot be imported; an error raised inside the plugin propagates as it is (its traceback
    points at the user's code)."""
    names = [str(n) for n in names]
    for name in names:
        if name in _loaded:
            continue
        if not MODULE_NAME.match(name):
            raise ConfigError(f"run.plugins entry {name!r} is not a module name: give the dotted "
                              "name of an importable module, e.g. my_package.my_rewards")
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is None or not name.startswith(exc.name):
                    raise  # the plugin itself imports something missing
                raise ConfigError(
                    f"run.plugins: cannot import {name!r} ({exc}); install it or put its folder on "
                    "PYTHONPATH (on a cluster: Ray's runtime_env py_modules)") from None
        _loaded.append(name)
    return names


def loaded() -> list[str]:
    """The plugin modules imported in this process, in order."""
    return list(_loaded)
