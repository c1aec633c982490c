"""The documentation cannot drift from the code.

- every shell command line the README, ``docs/*.md`` and ``cluster/README.md`` show that runs
  ``python -m align_rl.<command>`` (also after ``ray job submit ... --``) goes through that
  command's own argument parser and its configuration loading (``align_rl.config.load_config``:
  unknown keys and bad values are refused), without running the job;
- every configuration key they name in backticks (``dpo.seeds``) is a field of
  :class:`align_rl.config.Config`, and every Python name (``align_rl.evaluation.runner.
  run_evaluation``) exists;
- the "From Python" blocks of ``docs/usage.md`` run, in order, on a tiny world;
- the README's test command is the one ``.ci/run`` runs.

A failure names the file and the line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from align_rl.config import Config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md"]

SECTIONS = [f.name for f in dataclasses.fields(Config)]
FILE_SUFFIXES = {"py", "pt", "pt2", "md", "zarr", "yaml", "yml", "json", "jsonl", "nc", "csv",
                 "png", "npy", "npz", "onnx", "txt", "log", "sh", "toml"}
"""``name.<suffix>`` in backticks is a file name, not a configuration key."""

KEY_EXCEPTIONS: set[str] = set()
"""Dotted names in the docs that look like ``section.key`` but are not keys (none today)."""

_FENCE = re.compile(r"^```(\S*)\s*$")
_SHELL = {"bash", "sh", "shell", "console"}


# ----------------------------------------------------------------------------- reading the docs


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, line number of the first content line, lines)`` of every fenced block."""
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line.strip())
        if lang is None and m:
            lang, start, body = m.group(1), n + 1, []
        elif lang is not None and line.strip() == "```":
            out.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def prose(text: str) -> str:
    """``text`` with the fenced blocks blanked (line numbers kept)."""
    lines, inside = text.splitlines(), False
    for i, line in enumerate(lines):
        if _FENCE.match(line.strip()) or (inside and line.strip() == "```"):
            inside = not inside
            lines[i] = ""
        elif inside:
            lines[i] = ""
    return "\n".join(lines)


def inline_spans(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every inline code span outside fenced blocks (a span may wrap lines)."""
    body = prose(text)
    return [(body.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`([^`]+)`", body)]


def shell_lines(text: str) -> list[tuple[int, str]]:
    """``(line, command)`` of the fenced shell blocks, ``\\`` continuations joined, comments kept."""
    out = []
    for lang, start, body in fenced_blocks(text):
        if lang not in _SHELL:
            continue
        cur, first = "", 0
        for k, line in enumerate(body):
            if not cur:
                first = start + k
            if line.rstrip().endswith("\\"):
                cur += line.rstrip()[:-1] + " "
                continue
            cur += line
            if _open_quote(cur):  # a quoted argument that goes on over the next line
                cur += "\n"
                continue
            if cur.strip():
                out.append((first, cur.strip()))
            cur = ""
        if cur.strip():
            out.append((first, cur.strip()))
    return out


def _open_quote(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
    except ValueError as exc:
        return "closing quotation" in str(exc)
    return False


def command_lines(text: str) -> list[tuple[int, str]]:
    """Every shell command line, fenced or inline, that runs ``python -m align_rl.<command>``."""
    found = shell_lines(text) + inline_spans(text)
    return [(n, c) for n, c in found if re.search(r"\bpython3? -m align_rl\.", c)]


# ----------------------------------------------------------------------------- checking a command line


def _drop_optional_groups(cmd: str) -> str:
    """A synopsis's ``[--opt VALUE]`` groups removed. Only a ``[`` that starts a word outside
    quotes and braces opens one: ``key=[a, b]`` and ``"key={grid: [1, 2]}"`` are kept."""
    out, i, quote, braces = [], 0, "", 0
    while i < len(cmd):
        c = cmd[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "{}":
            braces += 1 if c == "{" else -1
        elif c == "[" and braces == 0 and (i == 0 or cmd[i - 1].isspace()):
            depth = 0
            while i < len(cmd):
                depth += {"[": 1, "]": -1}.get(cmd[i], 0)
                i += 1
                if depth == 0:
                    break
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _argv(cmd: str) -> tuple[str, list[str]]:
    """``(command, arguments)`` of the ``python -m align_rl.<command>`` in a command line."""
    toks = shlex.split(_drop_optional_groups(cmd), comments=True)
    for i in range(len(toks) - 2):
        if toks[i] in ("python", "python3") and toks[i + 1] == "-m" and toks[i + 2].startswith("align_rl."):
            rest = [t for t in toks[i + 3:] if t not in ("...", "…")]
            if rest and rest[-1] in ("&", "&&"):
                rest = rest[:-1]
            # a synopsis's alternatives (forecaster|vae|diffusion): the first one
            rest = [re.split(r"[|,]", t.strip("{}"))[0] if re.fullmatch(r"\{?\w+([|,][\w-]+)+\}?", t)
                    else t for t in rest]
            return toks[i + 2][len("align_rl."):], rest
    raise ValueError(f"no python -m align_rl.<command> in {cmd!r}")


def _placeholder(path: str) -> bool:
    """``FILE``, ``tune_configs/<name>.yaml``, ``<workdir>/…``: a path the reader fills in."""
    return "<" in path or bool(re.search(r"(^|/)[A-Z_]{3,}(\.|/|$)", path))


def _file(path: str | None, what: str) -> str | None:
    """The repository file ``path`` names, None for a placeholder; an error when it is missing."""
    if path is None or _placeholder(path):
        return None
    p = REPO / path
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist in the repository")
    return str(p)


def _parse(parser, argv: list[str], intermixed: bool = True):
    from align_rl.cli import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(parser, argv) if intermixed else parser.parse_args(argv)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue() else "bad arguments") from None


def check_command(name: str, argv: list[str]) -> None:
    """Parse ``python -m align_rl.<name> <argv>`` and load its configuration, running nothing;
    raises with the problem."""
    from align_rl import cli
    from align_rl.config import load_config

    if "<" in name:
        return  # python -m align_rl.<command>: the pattern, not a command
    try:
        mod = importlib.import_module(f"align_rl.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"there is no command align_rl.{name}") from None
    if name == "data":
        parser = importlib.import_module("align_rl.data.__main__")._parser()
        if not argv:
            return
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args, rest = parser.parse_known_args(argv)
        except SystemExit:
            raise ValueError(err.getvalue().strip().splitlines()[-1]) from None
        extra = [r for r in rest if "=" in r and not r.startswith("-")]
        if len(extra) != len(rest) or (extra and args.command != "simulate"):
            raise ValueError(f"unrecognized arguments: {rest}")
        if args.command == "simulate":
            load_config(_file(args.config, "--config"), list(args.overrides) + extra)
        return
    if not hasattr(mod, "build_parser"):
        raise ValueError(f"align_rl.{name} is not a command (no build_parser)")
    if not argv:
        return  # the command named, not run
    if name == "score":
        _parse(mod.build_parser(), argv, intermixed=False)
        return
    args = _parse(mod.build_parser(), argv)
    if name == "sweep":
        from align_rl.tune import spec as sweep_spec

        cfg_items, spec_ov = sweep_spec.split_overrides(args.overrides)
        spec_file = _file(args.spec, "the sweep file")
        if spec_file is None:
            load_config(_file(args.config, "--config"), cfg_items)
        else:
            spec = sweep_spec.load_spec(spec_file, spec_ov)
            sweep_spec.build_base_config(spec, _file(args.config, "--config"), cfg_items)
        return
    overrides = list(args.overrides)
    models = getattr(args, "models", [])
    specs, more = cli.split_model_specs(models)
    for s in specs:
        if "=" not in s:
            raise ValueError(f"--models entry {s!r} must be NAME=CHECKPOINT")
    names = list(dict.fromkeys(["reference"] + [s.partition("=")[0] for s in specs]))
    evaluated = [f"eval.models={json.dumps(names)}"] if specs and name == "evaluate" else []
    load_config(_file(args.config, "--config"), evaluated + overrides + more)


def command_problems(path_name: str, text: str) -> tuple[int, list[str]]:
    """(number of command lines checked, ``file:line: command: problem`` of each that fails)."""
    found = command_lines(text)
    problems = []
    for n, cmd in found:
        try:
            check_command(*_argv(cmd))
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its place
            problems.append(f"{path_name}:{n}: {cmd}\n    {type(exc).__name__}: {exc}")
    return len(found), problems


# ----------------------------------------------------------------------------- configuration keys


_KEY = re.compile(r"(?<![\w./<>@$-])(" + "|".join(sorted(SECTIONS, key=len, reverse=True))
                  + r")\.([A-Za-z_]\w*)(?![\w(])")


def _modules() -> dict[str, list[str]]:
    """Last name -> dotted names of the modules and packages of align_rl and actors."""
    out: dict[str, list[str]] = {}
    for pkg in ("align_rl", "actors"):
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] != "__main__":
                out.setdefault(parts[-1], []).append(".".join(parts))
    return out


MODULES = _modules()


def python_name(first: str, second: str) -> bool:
    """``first.second`` names a Python attribute or submodule of a module called ``first``
    (``actors.pool``, ``guidance.METHODS``, ``rewards.assim_reward``), not a configuration key."""
    for dotted in MODULES.get(first, []):
        if f"{dotted}.{second}" in {m for ms in MODULES.values() for m in ms}:
            return True
        if hasattr(importlib.import_module(dotted), second):
            return True
    return False


def key_problems(path_name: str, text: str) -> tuple[int, list[str]]:
    """(number of keys seen, ``file:line: key`` of each ``section.key`` named in backticks or in a
    shell block that is not a field of the configuration)."""
    spans = inline_spans(text) + shell_lines(text)
    seen, problems = 0, []
    for n, code in spans:
        for m in _KEY.finditer(code):
            sec, key = m.group(1), m.group(2)
            if key in FILE_SUFFIXES or f"{sec}.{key}" in KEY_EXCEPTIONS or python_name(sec, key):
                continue
            seen += 1
            fields = {f.name for f in dataclasses.fields(getattr(Config(), sec))}
            if key not in fields:
                problems.append(f"{path_name}:{n}: {sec}.{key} is not a configuration key "
                                f"(the {sec} section has {', '.join(sorted(fields))})")
    return seen, problems


# ----------------------------------------------------------------------------- Python names


_DOTTED = re.compile(r"(?<![\w./])((?:align_rl|actors)(?:\.[A-Za-z_]\w*)+)(?![\w/<])")


def resolves(dotted: str) -> bool:
    """``align_rl.io.pair_store.PairStore.reselect``: a module and attributes that exist."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for name in parts[k:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def name_problems(path_name: str, text: str) -> tuple[int, list[str]]:
    """(number of dotted Python names seen, ``file:line: name`` of each that does not exist)."""
    seen, problems = 0, []
    for n, code in inline_spans(text):
        for m in _DOTTED.finditer(code):
            first, second = m.group(1).split(".")[:2]
            if first == "actors" and second in {f.name for f in dataclasses.fields(Config().actors)}:
                continue  # the configuration key actors.<field>, not the package
            seen += 1
            if not resolves(m.group(1)):
                problems.append(f"{path_name}:{n}: {m.group(1)} does not exist")
    return seen, problems


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_name_in_the_docs_exists(doc):
    n, problems = name_problems(str(doc.relative_to(REPO)), doc.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_in_the_docs_parses(doc):
    n, problems = command_problems(str(doc.relative_to(REPO)), doc.read_text())
    assert not problems, "\n".join(problems)


def test_the_docs_show_command_lines_of_every_command():
    """The extraction finds the commands (a test that saw nothing would pass on anything)."""
    names = set()
    for doc in DOCS:
        for _, cmd in command_lines(doc.read_text()):
            names.add(_argv(cmd)[0])
    assert {"train", "pretrain", "evaluate", "network", "score", "sweep", "data"} <= names
    keys = sum(key_problems(d.name, d.read_text())[0] for d in DOCS)
    assert keys > 100  # the configuration keys the docs name, each checked
    assert sum(name_problems(d.name, d.read_text())[0] for d in DOCS) > 20  # and Python names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_key_named_in_the_docs_exists(doc):
    n, problems = key_problems(str(doc.relative_to(REPO)), doc.read_text())
    assert not problems, "\n".join(problems)


def test_the_checks_fail_on_a_key_or_command_that_does_not_exist():
    text = "\n".join([
        "Set `dpo.momentum` to 0.9, or `dpo.beta`.",                    # line 1: a made-up key
        "```bash",
        "python -m align_rl.train dpo.seeds=3",                          # line 3: fine
        "python -m align_rl.train dpo.momentum=0.9",                     # line 4: a made-up key
        "python -m align_rl.trainer --config cluster/paper_a100.yaml",   # line 5: no such command
        "python -m align_rl.pretrain everything",                        # line 6: no such stage
        "python -m align_rl.sweep tune_configs/nonexistent.yaml",        # line 7: no such file
        "```",
        "Then `python -m align_rl.evaluate --models A=a.pt eval.times=0`.",  # line 9: a bad value
        "`ray job submit -- python -m align_rl.train --nothing`",        # line 10: no such option
    ])
    n, problems = command_problems("synthetic.md", text)
    assert n == 7
    assert [p.split(":")[1] for p in problems] == ["4", "5", "6", "7", "9", "10"], problems
    assert "dpo.momentum" in problems[0] and "align_rl.trainer" in problems[1]
    assert "eval.times" in problems[4]
    n, problems = key_problems("synthetic.md", text)
    assert [p.split(":")[1] for p in problems] == ["1", "4"], problems
    assert all("dpo.momentum is not a configuration key" in p for p in problems)
    n, problems = name_problems("synthetic.md", "`align_rl.evaluate.run_evaluation` and\n"
                                "`align_rl.evaluation.runner.run_evaluation(cfg, ws, models)`")
    assert n == 2 and problems == ["synthetic.md:1: align_rl.evaluate.run_evaluation does not exist"]


def test_synopsis_lines_are_read_as_their_commands():
    assert _argv("python -m align_rl.pretrain forecaster|vae|diffusion [--config FILE] [key=value ...]"
                 ) == ("pretrain", ["forecaster"])
    assert _argv('python -m align_rl.sweep s.yaml [--config FILE] "search.dpo.lr={grid: [1, 2]}" a=[1, 2]'
                 ) == ("sweep", ["s.yaml", "search.dpo.lr={grid: [1, 2]}", "a=[1,", "2]"])
    assert _argv("X=1 ray job submit --working-dir . -- python -m align_rl.train --config c.yaml "
                 "pairs.variants=[M] # note") == ("train", ["--config", "c.yaml", "pairs.variants=[M]"])


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    onnx = re.search(r"^ONNX_JOB=(\S+)$", ci, re.M).group(1)
    ci_lines = {line.strip().replace('"$ONNX_JOB"', onnx) for line in ci.splitlines()}
    readme = [c for _, c in shell_lines((REPO / "README.md").read_text()) if c.startswith("python -m pytest")]
    assert readme, "the README shows no test command"
    for cmd in readme:
        bare = " ".join(shlex.split(cmd, comments=True))
        assert any(" ".join(shlex.split(c.rstrip("\\"))) == bare for c in ci_lines
                   if c.startswith("python -m pytest")), \
            f"README test command {cmd!r} is not what .ci/run runs"
    setup = (REPO / "README.md").read_text()
    for step in ("pip install torch==2.13.0", 'pip install -e ".[test]"'):
        assert step in setup and step.replace('-e ".[test]"', '-q -e ".[test]"').replace(
            "install torch", "install -q torch") in ci


# ----------------------------------------------------------------------------- "From Python"


CONFIG_CALL = 'load_config(None, ["run.workdir=runs/default"])'


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(start, "\n".join(body)) for lang, start, body in fenced_blocks(path.read_text())
            if lang == "python"]


def test_only_usage_md_holds_python_blocks():
    """Every Python block of the docs is one that the tiny-world test below runs."""
    others = [str(d.relative_to(REPO)) for d in DOCS if d.name != "usage.md" and python_blocks(d)]
    assert not others, f"Python blocks outside docs/usage.md are not run by a test: {others}"
    blocks = python_blocks(REPO / "docs" / "usage.md")
    assert len(blocks) >= 4 and CONFIG_CALL in blocks[0][1]
    assert "actors.install()" in blocks[0][1]


@pytest.mark.slow  # the tiny main job in this process: a few minutes on 2 cores
def test_from_python_blocks_run_on_a_tiny_world(tmp_path, ray_session, monkeypatch):
    from .tiny_align import OVERRIDES, TRAIN_OVERRIDES, write_tiny_world

    monkeypatch.chdir(tmp_path)
    world = write_tiny_world(tmp_path / "world.zarr")
    tiny = OVERRIDES + TRAIN_OVERRIDES + [f"data.path={world}", f"run.workdir={tmp_path / 'run'}"]
    ns: dict = {"__name__": "docs_usage"}
    for start, code in python_blocks(REPO / "docs" / "usage.md"):
        code = code.replace(CONFIG_CALL, f"load_config(None, {tiny!r})")
        try:
            exec(compile(code, f"docs/usage.md:{start}", "exec"), ns)  # noqa: S102 - our own docs
        except Exception as exc:
            raise AssertionError(f"docs/usage.md, the Python block at line {start}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    assert (tmp_path / "run" / "eval" / "report.md").is_file()
    assert ns["an"].fields.shape[:2] == (2, ns["cfg"].sampler.members)
    assert ns["res"].step == ns["cfg"].dpo.steps
    assert float(ns["ds"].time_mean.sel({"setting": "main", "model": "Align-M", "method": "dps",
                                         "kind": "analysis", "stat": "member", "metric": "mse"})) > 0
