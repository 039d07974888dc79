"""A user's mistakes, made as a new user makes them: every command turns one into a single line on stderr and exit
code 1 (argparse's usage errors: 2), never a traceback; it writes nothing, and starts nothing heavy — for `search`,
nothing after the cheap checks (the spec, the servers it names, the data and weights against the model): no
pre-flight pruning, no MLflow store, no Ray, no training.

In-process (`autoprune.cli.main`), so that hundreds of mistakes take seconds; the subprocess path (imports, exit
codes) is test_cli.py's."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_spec import DEMO

from autoprune import cli
from autoprune.driver import search as search_module
from autoprune.testing.loopback import free_port

SECONDS = 20  # "a few seconds" with room for a busy machine: what is caught here costs well under one


class HeavyWorkStarted(BaseException):
    """Raised where `search` would begin its first heavy step; a BaseException, so that nothing turns it into a
    user's error on the way out."""


@pytest.fixture
def stop_before_heavy_work(monkeypatch):
    def reached(*args, **kwargs):
        raise HeavyWorkStarted

    monkeypatch.setattr(search_module, "check_methods", reached)  # the pre-flight pruning: the first heavy step


@contextlib.contextmanager
def _scratch():
    """A fresh working directory, the command's cwd, whose contents are compared before and after."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(previous)


def _listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _run(argv: list[str], capsys) -> tuple[int | str, str]:
    """(exit code, stderr) of `autoprune ARGV…`; "heavy" where a search got past its cheap checks."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    except HeavyWorkStarted:
        code = "heavy"
    return code, capsys.readouterr().err


def _one_line(code, err: str, *, usage: bool = False) -> str:
    lines = err.strip().splitlines()
    assert code == (2 if usage else 1), err
    assert "Traceback" not in err, err
    if usage:  # argparse: its usage line, then the error
        assert lines[-1].startswith("autoprune") and ": error: " in lines[-1], err
        return lines[-1]
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: "), err
    return lines[0]


# ---- the spec, mutated ------------------------------------------------------------------------------------------

def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


PATHS = sorted(_paths(DEMO), key=str)
KEYS = [path for path in PATHS if isinstance(path[-1], str) and "kwargs" not in path[:-1]]  # kwargs: timm's own
WRONG_VALUES = st.sampled_from(["fast", "", -1, 0, 1e12, float("nan"), float("inf"), True, None, [], ["x"], {},
                                {"low": 2, "high": 1}, {"a": 1}, 3.5])
BROKEN_FILES = ["missing", "directory", "binary", "empty_dir", "empty_class", "text"]


def _node(raw, path):
    for key in path:
        raw = raw[key]
    return raw


def _typo(key: str, how: int) -> str:
    return [key + "s", key[:-1] or "x", key.upper(), key.replace("_", "-") if "_" in key else key + "_"][how % 4]


def _broken_path(folder: Path, kind: str) -> str:
    """A path a user might give by mistake, made in `folder` (which the test's listing ignores)."""
    path = folder / kind
    if kind == "directory" or kind == "empty_dir":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "text":
        path.write_text("not what was asked for\n")
    elif kind == "empty_class":  # an ImageFolder tree whose class folder holds no image
        (path / "class0").mkdir(parents=True)
    return str(path)


mistakes = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("rename"), st.sampled_from(KEYS), st.integers(0, 3)),
    st.tuples(st.just("set"), st.sampled_from(PATHS), WRONG_VALUES),
    st.tuples(st.just("data"), st.sampled_from(["train_dir", "val_dir"]), st.sampled_from(BROKEN_FILES)),
    st.tuples(st.just("checkpoint"), st.just(("model", "checkpoint")), st.sampled_from(BROKEN_FILES)),
    st.tuples(st.just("spec_file"), st.just(()), st.sampled_from(["missing", "directory", "binary", "empty",
                                                                   "list", "unclosed"])),
)


def _mistaken(raw: dict, mistake, inputs: Path) -> tuple[dict | None, str | None, list[str], bool]:
    """Apply one mistake: (the spec, or None when the spec file itself is the mistake; that file's path; the words
    of which the error must name one; whether the mistake can be harmless, e.g. an optional key left out)."""
    kind, path, value = mistake
    if kind == "delete":
        del _node(raw, path[:-1])[path[-1]]
        return raw, None, [str(part) for part in path], True
    if kind == "rename":
        parent = _node(raw, path[:-1])
        new = _typo(path[-1], value)
        if new in parent:
            return raw, None, [], True
        parent[new] = parent.pop(path[-1])
        return raw, None, [new, ".".join(map(str, path))], False
    if kind == "set":
        _node(raw, path[:-1])[path[-1]] = copy.deepcopy(value)
        return raw, None, [str(part) for part in path], True
    if kind == "data":
        good = str(_tree(inputs / "good"))
        raw["data"] = {"source": "imagefolder", "train_dir": good, "val_dir": good, path: _broken_path(inputs, value)}
        return raw, None, [f"data.{path}"], False
    if kind == "checkpoint":
        raw["model"].pop("train_steps")
        raw["model"]["checkpoint"] = _broken_path(inputs, value)
        return raw, None, ["model.checkpoint"], False
    spec = inputs / "spec.yaml"
    if value == "directory":
        spec.mkdir()
    elif value == "binary":
        spec.write_bytes(bytes(range(256)) * 4)
    elif value == "empty":
        spec.write_text("")
    elif value == "list":
        spec.write_text("- name: demo\n")
    elif value == "unclosed":
        spec.write_text("name: [demo\n")
    return None, str(spec), ["spec.yaml"], False


def _tree(root: Path) -> Path:
    if not root.exists():
        for index in range(10):
            (root / f"class{index}").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / f"class{index}" / "0.png")
    return root


@settings(max_examples=int(os.environ.get("MISTAKES", 200)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mistake=mistakes)
def test_any_mistake_in_the_demo_spec_is_one_line_naming_it_before_anything_heavy(
        mistake, capsys, stop_before_heavy_work):
    with _scratch() as cwd, tempfile.TemporaryDirectory() as inputs:
        raw, spec_path, names, may_be_harmless = _mistaken(copy.deepcopy(DEMO), mistake, Path(inputs))
        if spec_path is None:
            spec_path = str(Path(inputs) / "spec.yaml")
            Path(spec_path).write_text(yaml.safe_dump(raw))
        before = _listing(cwd)
        started = time.perf_counter()
        code, err = _run(["search", spec_path], capsys)
        assert time.perf_counter() - started < SECONDS
        assert _listing(cwd) == before  # no store, no Ray run, no cache
        event(f"{mistake[0]}: {'passed the cheap checks' if code == 'heavy' else 'an error'}")
        if code == "heavy":  # every cheap check passed: only a mistake that can be harmless may get there
            assert may_be_harmless, f"{mistake} reached the pre-flight pruning"
            return
        line = _one_line(code, err)
        assert not names or any(name in line for name in names), (mistake, line)


# ---- every command, given bad arguments ---------------------------------------------------------------------------

def _demo() -> str:
    return str(Path(__file__).parents[1] / "search_spaces" / "demo.yaml")


NOWHERE = f"http://127.0.0.1:{free_port()}"  # nothing listens there

CASES = [  # (argv, usage error?, what the line says)
    (["search", "nope.yaml"], False, "spec file 'nope.yaml' does not exist"),
    (["search", "."], False, "is a directory"),
    (["search", _demo(), "--trials", "0"], True, "argument --trials: must be > 0, but got 0"),
    (["search", _demo(), "--tracking-uri", NOWHERE], False, "does not answer (Connection refused)"),
    (["search", _demo(), "--address", f"127.0.0.1:{free_port()}"], False, "nothing answers at 127.0.0.1:"),
    (["search", _demo(), "--resume", "--warm-start", "r1"], False, "give one of them"),
    (["demo", "--trials", "-3"], True, "argument --trials: must be > 0"),
    (["best", "--model", "m", "--max-latency-ms", "-1"], True, "argument --max-latency-ms: must be > 0"),
    (["best", "--model", "m", "--max-latency-ms", "fast"], True, "expected a number, but got 'fast'"),
    (["best", "--model", "m", "--max-latency-ms", "5"], False, "no MLflow store at"),
    (["best", "--model", "m", "--max-latency-ms", "5", "--tracking-uri", NOWHERE], False, "does not answer"),
    (["front"], False, "no MLflow store at"),
    (["front", "--experiment", "e", "--run", "r"], True, "not allowed with argument"),
    (["front", "--run", "r", "--tracking-uri", NOWHERE], False, "does not answer"),
    (["ui", "--port", "0"], True, "argument --port: must be a TCP port"),
    (["ui"], False, "no MLflow store at"),
    (["serve", "--model", "m", "--max-latency-ms", "5", "--port", "70000"], True, "must be a TCP port"),
    (["publish", "r1"], False, "no MLflow store at"),
    (["retarget", "r1"], False, "no MLflow store at"),
    (["retarget", "r1", "--cpus", "0"], True, "argument --cpus: must be > 0"),
    (["retarget", "r1", "--device", "tpu"], True, "invalid choice: 'tpu'"),
    (["check", "resnet-18"], False, "'resnet-18' is not a timm model. Did you mean resnet18,"),
    (["check", "resnet18", "--kwargs", "{depth: 3"], False, "--kwargs: not JSON"),
    (["check", "resnet18", "--kwargs", "[1]"], False, "--kwargs: expected a JSON object"),
    (["check", "resnet18", "--kwargs", '{"depth": 3}'], False, "model.kwargs: timm cannot build 'resnet18'"),
    (["check", "resnet18", "--methods", "magnitde"], False, "'magnitde' is not a registered pruning method"),
    (["check", "resnet18", "--sparsities", "1.5"], True, "must be between 0 and 1"),
    (["check", "resnet18", "--input-size", "3", "0", "0"], True, "argument --input-size: must be > 0"),
    (["bench", "noise", "--busy", "-1"], True, "argument --busy: must be >= 0"),
    (["bench", "latency", "--repeats", "0"], True, "argument --repeats: must be > 0"),
    (["bench", "search", "--seeds", "2"], True, "the following arguments are required: --json"),
    (["bench", "nothing"], True, "invalid choice: 'nothing'"),
]


@pytest.mark.parametrize(("argv", "usage", "says"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_a_command_given_bad_arguments_says_so_in_one_line(argv, usage, says, capsys, stop_before_heavy_work):
    import ray

    ray_before = ray.is_initialized()
    with _scratch() as cwd:
        code, err = _run(argv, capsys)
        assert not _listing(cwd), _listing(cwd)  # nothing written: no ./autoprune_runs, no ./mlruns, no mlflow.db
    assert says in _one_line(code, err, usage=usage)
    assert ray.is_initialized() == ray_before  # Ray was not started for a mistake


def test_serve_on_a_port_in_use_is_one_line_before_ray_starts(capsys):
    import ray

    ray_before = ray.is_initialized()
    with socket.socket() as holder, _scratch() as cwd:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, err = _run(["serve", "--model", "m", "--max-latency-ms", "5", "--port", str(port)], capsys)
        assert not _listing(cwd)
    assert f"cannot serve on 127.0.0.1:{port} (Address already in use)" in _one_line(code, err)
    assert ray.is_initialized() == ray_before


def test_every_command_and_table_has_help_that_prints(capsys):
    """`--help` of every command and every bench table: argparse formats each help text (a bare `%` in one broke
    `autoprune bench --help`)."""
    from autoprune.bench.commands import TABLES

    commands = [[name] for name in cli.COMMANDS] + [["bench", table] for table in TABLES]
    for argv in commands:
        with pytest.raises(SystemExit) as stop:
            cli.main([*argv, "--help"])
        assert stop.value.code == 0, argv
        assert capsys.readouterr().out.startswith(f"usage: autoprune {' '.join(argv)}")
