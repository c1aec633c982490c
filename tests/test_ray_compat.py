"""Ray's private hooks (align_rl.ray_compat) against the installed Ray: the pinned versions, the
progress-bar marker, the workers' printer swap, Ray's own printer and the bar manager."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from align_rl import ray_compat

ROOT = Path(__file__).resolve().parents[1]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_the_installed_ray_is_a_known_version_and_pyproject_pins_the_same():
    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray[")]
    assert pin.split("]", 1)[1].split(";")[0].strip() == ",".join(ray_compat.KNOWN_RAY)
    lo, hi = (_version(b) for b in ray_compat.KNOWN_RAY)
    assert lo <= _version(ray.__version__) < hi


def test_the_bar_marker_is_ray_s():
    from ray.experimental import tqdm_ray

    assert ray_compat.TQDM_MAGIC == tqdm_ray.RAY_TQDM_MAGIC


def test_the_workers_printer_is_swapped_only_where_ray_prints(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    got = []
    monkeypatch.setattr(dispatcher, "handlers", [])
    assert ray_compat.replace_worker_printer(got.append) is False  # log_to_driver off: nothing
    assert dispatcher.handlers == []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda b: None)])
    assert ray_compat.replace_worker_printer(got.append) is True
    dispatcher.emit({"lines": ["x"]})
    assert got == [{"lines": ["x"]}] and [n for n, _ in dispatcher.handlers] == ["ray_print_logs"]


def test_ray_s_own_printer_prefixes_the_process(capsys):
    ray_compat.print_batch({"ip": "10.0.0.2", "localhost": "10.0.0.1", "pid": "raylet", "is_err": False,
                            "lines": ["worker killed for memory"], "actor_name": "", "task_name": ""})
    cap = capsys.readouterr()
    assert "worker killed for memory" in cap.out + cap.err
    assert "raylet" in cap.out + cap.err


def test_the_bar_manager_hides_and_shows_the_workers_bars():
    from ray.experimental import tqdm_ray

    tqdm_ray.instance()  # the driver's manager, created on first use
    mgr = ray_compat.bar_manager()
    assert mgr is tqdm_ray._manager
    mgr.hide_bars()
    mgr.unhide_bars()


@pytest.mark.parametrize("closed", [False, True])
def test_a_bar_state_reaches_the_manager(monkeypatch, closed):
    from ray.experimental import tqdm_ray

    seen = []
    monkeypatch.setattr(tqdm_ray._manager if tqdm_ray._manager else tqdm_ray.instance(),
                        "process_state_update", seen.append)
    state = {"__magic_token__": ray_compat.TQDM_MAGIC, "x": 1, "pos": 0, "desc": "d", "total": 2,
             "unit": "it", "ip": "127.0.0.1", "pid": 1, "uuid": "u", "closed": closed}
    ray_compat.apply_bar_state(state)
    assert seen == [state]
