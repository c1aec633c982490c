"""The analysis times of one split with everything a candidate needs around them.

:func:`open_split` is the one way a stage reads the truth around a split's dates and its 48 h
backgrounds (:func:`truth_window`): the preference split, the learner's and the sweep's validation,
and the evaluation's test split all use it. :class:`SplitData` opens the truth of a time range (``data.pref``, ``data.val``, …) with the margin
that backgrounds and 48 h forecasts need, ensures the 48 h backgrounds (cached), and lists the
usable analysis times: those with a background, the truth, and (with the forecast reward) the truth
6 h before and ``rewards.forecast_hours`` after. The preference pairs use ``data.pref``; the
learner's validation uses ``data.val``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from align_rl.alignment.candidates import background_order, make_tasks, valid_times
from align_rl.errors import InputError
from align_rl.io import era5
from align_rl.io.states import States
from align_rl.world.backgrounds import LEAD_STEPS, ensure_backgrounds

STEP_HOURS = 6
"""The data's and the forecaster's time step."""


def truth_window(dates: list, forecast_hours: int) -> tuple[np.datetime64, np.datetime64]:
    """The truth that analyses on the days ``dates`` ([first, last]) need: from the first
    background's earlier input (``48 h + 6 h`` before the first day) with one step to spare, to the
    end of the last day plus ``forecast_hours`` (the forecast reward, the evaluation's forecasts)
    and one step."""
    step = np.timedelta64(STEP_HOURS, "h")
    start = np.datetime64(dates[0]) - (LEAD_STEPS + 2) * step
    end = np.datetime64(dates[-1]) + np.timedelta64(1, "D") + np.timedelta64(int(forecast_hours), "h") + step
    return start, end


def open_split(cfg: Any, ws: Any, store: Any, forecaster: Any, dates: list,
               progress: bool = True) -> tuple[States, States]:
    """``(truth, backgrounds)`` in physical units around the days ``dates`` (:func:`truth_window`
    of ``rewards.forecast_hours``): the truth read from ``store`` on the model grid, the 48 h
    backgrounds from their cache (computed where missing, :func:`ensure_backgrounds`)."""
    start, end = truth_window(dates, cfg.rewards.forecast_hours)
    truth = era5.open_states(store, time_range=[start, end], coarsen=cfg.data.coarsen,
                             expect_grid=cfg.data.grid, check_units=cfg.checks.units)
    return truth, ensure_backgrounds(cfg, ws, truth, forecaster, progress=progress)


class SplitData:
    """Truth and backgrounds (physical units) of a split, its usable times and a seeded order.

    ``split``: the name of a ``data`` range (``pref``, ``val``, ``test``, ``train``)."""

    def __init__(self, cfg: Any, ws: Any, store: Any, models: Any, progress: bool = True,
                 split: str = "pref") -> None:
        rng_ = list(getattr(cfg.data, split))
        self.split = split
        self.truth, self.backgrounds = open_split(cfg, ws, store, models.forecaster, rng_, progress)
        self.normalizer = models.normalizer or era5.load_normalizer(store)
        fh = cfg.rewards.forecast_hours if "forecast" in cfg.rewards.names else None
        self.forecast_hours = fh
        self.times = valid_times(self.truth.times, self.backgrounds.times, rng_[0], rng_[-1], fh)
        if len(self.times) == 0:
            raise InputError(f"no time of data.{split}={rng_} has a background and the truth "
                             "around it; widen the range or simulate more days (data.days)")
        self.order = background_order(len(self.times), cfg.run.seed)
        self.lat, self.lon = self.truth.lat, self.truth.lon

    def tasks(self, ids):
        """:class:`~align_rl.alignment.candidates.BackgroundTask` of background ids (positions in ``times``)."""
        return make_tasks(ids, self.times, self.truth, self.backgrounds, self.normalizer,
                          self.forecast_hours)

    def spread_ids(self, n: int) -> list[int]:
        """``n`` ids evenly spread over the split's times (validation sets: a steady sample of the
        trajectory rather than neighbouring, correlated times)."""
        n = min(int(n), len(self.times))
        return [int(i) for i in np.unique(np.round(np.linspace(0, len(self.times) - 1, n)).astype(int))]
