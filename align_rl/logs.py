"""The console and the log file of a run.

The console shows what a person follows: one line when a stage starts and one when it ends, with
its duration (:func:`stage`); the messages of the ``align_rl`` loggers (INFO and above); progress
bars, a worker's bar (Ray's ``tqdm_ray``) drawn until that worker closes it; warnings of other
libraries; errors.

The log file, ``<workdir>/logs/align_rl.log`` once :func:`setup` ran (appended to by every run in
that workdir), holds everything with timestamps: the console's lines, what the process prints,
Python warnings, Ray's own log records (below ERROR they stay off the console) and every line the
Ray workers write (the driver receives them through Ray's log stream, :func:`route_ray`; only
their progress bars go on to the console). Ray's private hooks this needs are in
:mod:`align_rl.ray_compat`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from align_rl import ray_compat

LOG_FILE = Path("logs") / "align_rl.log"
"""Where :func:`setup` writes, relative to the workdir."""

FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_QUIET_PREFIXES = ("ray", "py.warnings")  # on the console from ERROR on only


def _raw(stream: Any) -> Any:
    """The console stream below a :class:`_Tee`."""
    return getattr(stream, "_tee_console", stream)


@contextlib.contextmanager
def _bars_cleared(stream: Any) -> Iterator[None]:
    """Clear the progress bars on the console (tqdm's, and the workers' bars of Ray's tqdm_ray)
    while a line is written to ``stream`` (``sys.stdout`` or ``sys.stderr``), then draw them again."""
    mgr = ray_compat.bar_manager()
    tqdm = sys.modules.get("tqdm")
    ctx = tqdm.tqdm.external_write_mode(file=stream) if tqdm is not None else contextlib.nullcontext()
    if mgr is not None:
        mgr.hide_bars()
    try:
        with ctx:
            yield
    finally:
        if mgr is not None:
            mgr.unhide_bars()


class ConsoleHandler(logging.Handler):
    """Lines ``HH:MM:SS [logger name] message`` on the current ``sys.stdout`` (or ``sys.stderr``),
    progress bars cleared around each line."""

    def __init__(self, level: int = logging.INFO, stream: str = "stdout"):
        super().__init__(level)
        self.stream_name = stream
        self.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            current = getattr(sys, self.stream_name)
            stream = _raw(current)  # the log file has its own handler
            with _bars_cleared(current):
                stream.write(msg + "\n")
                stream.flush()
        except Exception:  # pragma: no cover - as logging.StreamHandler
            self.handleError(record)


class _OthersFilter(logging.Filter):
    """Records of other libraries on the console: warnings and errors, but Ray's own records and
    Python warnings only from ERROR on, except warnings raised in align_rl's own code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "py.warnings":
            return "/align_rl/" in str(record.getMessage())
        if any(record.name == p or record.name.startswith(p + ".") for p in _QUIET_PREFIXES):
            return False
        return record.levelno >= logging.WARNING


class _Tee:
    """A text stream that writes to the console stream and hands each complete line to the log
    file (the last state of a line redrawn with ``\\r``, colour codes removed)."""

    def __init__(self, console: Any, name: str, sink: "_Sink"):
        self._tee_console = console
        self._name, self._sink, self._buf = name, sink, ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        n = self._tee_console.write(s)
        with self._lock:
            buf = self._buf + s
            *lines, self._buf = buf.split("\n")
            self._buf = self._buf.rsplit("\r", 1)[-1][-10000:]
        for line in lines:
            line = _ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip()
            if line.strip():
                self._sink.line(self._name, line)
        return len(s) if n is None else n

    def flush(self) -> None:
        self._tee_console.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._tee_console, name)


class _Sink(logging.Handler):
    """The log file, opened when the workdir exists (a command that stops on bad input before
    any stage ran writes nothing); records and plain lines until then are kept and written first."""

    def __init__(self, path: Path):
        super().__init__(logging.DEBUG)
        self.path = path
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self._file: logging.FileHandler | None = None
        self._pending: list[logging.LogRecord] = []
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            if not self.path.parent.parent.is_dir():
                self._pending = (self._pending + [record])[-10000:]
                return
            self.path.parent.mkdir(exist_ok=True)
            self._file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
            self._file.setFormatter(self.formatter)
            for r in self._pending:
                self._file.emit(r)
            self._pending = []
        self._file.emit(record)

    def line(self, name: str, text: str, level: int = logging.INFO) -> None:
        """A plain line (printed output, a worker's line) as a record of logger ``name``."""
        if getattr(self._busy, "on", False):  # an error while writing the file: no loop
            return
        self._busy.on = True
        try:
            self.handle(logging.makeLogRecord(
                {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": text}))
        finally:
            self._busy.on = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


LOG = logging.getLogger("align_rl")
_CONSOLE = ConsoleHandler()
_OTHERS = ConsoleHandler(logging.WARNING, "stderr")
_OTHERS.addFilter(_OthersFilter())
_sink: _Sink | None = None
_closed_bars: set[str] = set()
LOG.setLevel(logging.INFO)
LOG.addHandler(_CONSOLE)
LOG.propagate = False


def log_path() -> Path | None:
    """The log file of this process (None before :func:`setup`)."""
    return None if _sink is None else _sink.path


def setup(workdir: str | Path, command: str = "") -> Path:
    """Write the log file ``<workdir>/logs/align_rl.log`` from now on (see the module docstring;
    created once the workdir exists) and keep Ray's records and Python warnings off the console.
    ``command``: the first line of this run in the file (default: ``sys.argv``). Returns the
    file's path; a second call moves the log to the new workdir."""
    global _sink
    path = Path(workdir).expanduser().resolve() / LOG_FILE
    close()
    _sink = _Sink(path)
    LOG.addHandler(_sink)
    root = logging.getLogger()
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(_sink)
    root.addHandler(_OTHERS)
    logging.captureWarnings(True)
    sys.stdout = _Tee(sys.stdout, "stdout", _sink)
    sys.stderr = _Tee(sys.stderr, "stderr", _sink)
    _sink.line("align_rl", f"==== {command or ' '.join(sys.argv)}")
    route_ray()
    LOG.info(f"log file: {path}")
    return path


def close() -> None:
    """Stop writing the log file and give back the console streams (tests; a second setup)."""
    global _sink
    if _sink is None:
        return
    for lg in (LOG, logging.getLogger()):
        lg.removeHandler(_sink)
    logging.getLogger().removeHandler(_OTHERS)
    logging.captureWarnings(False)
    for name in ("stdout", "stderr"):
        if isinstance(getattr(sys, name), _Tee):
            setattr(sys, name, _raw(getattr(sys, name)))
    _sink.close()
    _sink = None


# ----------------------------------------------------------------------------- Ray


def route_ray() -> None:
    """With a log file: Ray's ``ray`` loggers write to it (and reach the console from ERROR on),
    and, in a driver connected with ``log_to_driver``, the workers' output goes to it instead of
    the console while their progress bars still reach the console. No-op before :func:`setup` or
    while Ray is not imported; called by :func:`setup` and
    :func:`align_rl.training.harness.init_ray`."""
    if _sink is None or "ray" not in sys.modules:
        return
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()  # Ray's own console handler
    ray_logger.propagate = True  # to the root: the log file, and the console from ERROR on
    import ray

    if ray.is_initialized():
        ray_compat.replace_worker_printer(_worker_output)


def _worker_output(batch: dict) -> None:
    """One batch of lines of one Ray process (Ray's log stream): progress-bar states to the bars
    on the console, every other line to the log file; Ray's raylet and autoscaler messages (a
    worker killed for memory, a request that cannot be scheduled) also to the console."""
    pid = batch.get("pid")
    who = batch.get("actor_name") or batch.get("task_name") or ""
    ip = batch.get("ip")
    where = f"({who + ' ' if who else ''}pid={pid}{'' if ip == batch.get('localhost') else f', ip={ip}'})"
    if pid in ("raylet", "autoscaler"):  # printed on the console, and so in the log file
        ray_compat.print_batch(batch)
        return
    for line in batch.get("lines", []):
        if ray_compat.TQDM_MAGIC in line:
            _bar_state(line)
        elif _sink is not None:
            _sink.line("worker", f"{where} {_ANSI.sub('', line)}")


def _bar_state(line: str) -> None:
    """Apply a worker's bar state once: a state of a bar already closed (the same state can come
    twice, from stdout and from Ray Train's copy of the output) would draw a new bar that no
    worker ever closes."""
    try:
        state = json.loads(line)
        uuid = state["uuid"]
    except (ValueError, KeyError, TypeError):
        return
    if uuid in _closed_bars:
        return
    if state.get("closed"):
        _closed_bars.add(uuid)
    ray_compat.apply_bar_state(state)


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """A stage being timed: ``name``, ``seconds`` (set when it ends)."""

    name: str
    seconds: float = 0.0


@contextlib.contextmanager
def stage(name: str, log: logging.Logger = LOG) -> Iterator[Stage]:
    """Log ``name ...`` when the block starts and ``name done in X s`` (or ``name failed after
    X s: Error``) when it ends; the :class:`Stage` yielded holds the duration afterwards."""
    st = Stage(name)
    log.info(f"{name} ...")
    t0 = time.perf_counter()
    try:
        yield st
    except BaseException as exc:
        st.seconds = time.perf_counter() - t0
        log.info(f"{name} failed after {_dur(st.seconds)}: {type(exc).__name__}")
        raise
    st.seconds = time.perf_counter() - t0
    log.info(f"{name} done in {_dur(st.seconds)}")


def _dur(s: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
