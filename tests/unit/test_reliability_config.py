"""Every option is validated (type, range, finiteness, choices) before anything runs: one line on
stderr, exit code 2, no traceback, no file written. Config files: JSON is JSON, duplicate keys refused."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_cnn import config
from dist_cnn.commands import main as cli_main

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

BASE = [
    "--dataset",
    "synthetic",
    "--synthetic-train-size",
    "256",
    "--synthetic-test-size",
    "64",
    "--batch-size",
    "64",
    "--max-steps",
    "1",
    "--wandb",
    "disabled",
    "--no-progress",
    "--precision",
    "fp32",
    "--no-download",
]
SCHEMA = [(section, f, typing.get_type_hints(cls)[f.name]) for section, cls in config.sections() for f in fields(cls)]


def flag_of(f) -> str:
    return config.flag_name(f)


# ---------------------------------------------------------------------------------------- bad values


def limits(f) -> tuple:
    """(low, high, low is open, high is open) from the field's metadata."""
    m = f.metadata
    lo, lo_open = (m["above"], True) if m.get("above") is not None else (m["low"], False)
    hi, hi_open = (m["below"], True) if m.get("below") is not None else (m["high"], False)
    return lo, hi, lo_open, hi_open


def bad_numbers(f, typ) -> st.SearchStrategy:
    lo, hi, lo_open, hi_open = limits(f)
    below = (
        st.integers(min_value=-(10**12), max_value=lo - 1)
        if typ is int
        else st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False, allow_infinity=False)
    )
    above = (
        st.integers(min_value=hi + 1, max_value=10**30)
        if typ is int
        else st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False, allow_infinity=False)
    )
    special = st.sampled_from([float("nan"), float("inf"), float("-inf")]) if typ is float else st.nothing()
    return st.one_of(below, above, special)


def wrong_type_json(typ) -> st.SearchStrategy:
    """Values a JSON config file can hold that are not of the field's type (ints count as floats)."""
    pool = {
        "text": st.text(max_size=8),
        "none": st.none(),
        "bool": st.booleans(),
        "int": st.integers(min_value=-(10**20), max_value=10**20),
        "float": st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)),
        "list": st.lists(st.integers(), min_size=1, max_size=2),
        "dict": st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
    }
    exclude = {int: {"int"}, float: {"int", "float"}, str: {"text"}, bool: {"bool"}, list: set()}[typ]
    return st.one_of([v for k, v in pool.items() if k not in exclude])


def bad_text(key: str, choices) -> st.SearchStrategy:
    control = st.builds(
        lambda a, c, b: a + c + b,
        st.text(max_size=4),
        st.sampled_from(["\x00", "\n", "\x1b", "\t"]),
        st.text(max_size=4),
    )
    if choices:
        return st.one_of(control, st.text(max_size=12).filter(lambda v: v not in choices))
    extra = [st.just(""), st.just("   ")] if key in config.NONEMPTY else []
    if key == "log.wandb_project":
        extra.append(st.sampled_from(["a/b", "x#y", "p?q", "100%", "c:d"]))
    if key == "log.wandb_tags":
        extra.append(st.text(min_size=65, max_size=80, alphabet="abc"))
    return st.one_of(control, *extra)


@st.composite
def bad_option(draw):
    """(route, section, field, value): one option set to a value the schema must refuse."""
    section, f, typ = draw(st.sampled_from(SCHEMA))
    key = f"{section}.{f.name}"
    routes = ["json"] + (["flag"] if typ in (int, float, str) else [])
    route = draw(st.sampled_from(routes))
    if typ in (int, float):
        value = draw(
            st.one_of(bad_numbers(f, typ), wrong_type_json(typ))
            if route == "json"
            else st.one_of(
                bad_numbers(f, typ),
                st.sampled_from(["abc", "", "1e", "0x10", "--", "1,5"] + (["1.5"] if typ is int else [])),
            )
        )
        if route == "json" and typ is float and isinstance(value, float) and not math.isfinite(value):
            pass  # json.dumps writes NaN/Infinity, which Python's json reads back
    elif typ is str:
        value = draw(
            st.one_of(bad_text(key, f.metadata.get("choices")), wrong_type_json(str))
            if route == "json"
            else bad_text(key, f.metadata.get("choices"))
        )
    elif typ is bool:
        value = draw(wrong_type_json(bool))
    else:  # list of strings
        value = draw(st.one_of(wrong_type_json(list), st.lists(bad_text(key, None), min_size=1, max_size=2)))
    return route, section, f, value


def run_main(argv: list[str], cwd: Path) -> tuple[int, str]:
    err, old = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli_main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(old)
    return code, err.getvalue()


def without_flag(argv: list[str], flag: str) -> list[str]:
    """argv minus `flag` and its value (a flag would override the config file's value)."""
    no = "--no-" + flag[2:]
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == flag:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        elif a != no:
            out.append(a)
    return out


def check_refused(route, section, f, value):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        argv = [*BASE, "--out", str(tmp / "run")]
        if route == "flag":
            argv += [f"{flag_of(f)}={value}"]  # '=' so a value starting with '-' stays a value
        else:
            (tmp / "c.json").write_text(json.dumps({section: {f.name: value}}))
            argv = ["--config", str(tmp / "c.json"), *without_flag(argv, flag_of(f))]
        before = sorted(p.name for p in tmp.iterdir())
        code, err = run_main(argv, tmp)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (argv, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp.iterdir()) == before, (argv, "wrote files")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_option())
def test_every_bad_option_value_is_one_line_exit_2(case):
    check_refused(*case)


@pytest.mark.parametrize("section,f,typ", SCHEMA, ids=[f"{s}.{f.name}" for s, f, _ in SCHEMA])
def test_each_option_has_a_refused_value(section, f, typ):
    """Deterministic coverage of every field (the property test samples them at random)."""
    if typ in (int, float):
        lo, hi, lo_open, _ = limits(f)
        check_refused("flag", section, f, lo - 1 if typ is int else (lo if lo_open else lo - 1))
        check_refused("json", section, f, "1")
    elif typ is str:
        check_refused("flag", section, f, "bad\x00value")
        check_refused("json", section, f, 3)
    elif typ is bool:
        check_refused("json", section, f, "yes")
    else:
        check_refused("json", section, f, "a-string")


# ---------------------------------------------------------------------------------------- config files


def test_json_config_is_parsed_as_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"optim": {"lr": 1e-3, "weight_decay": 5e-4}, "train": {"epochs": 3}}')
    cfg = config.Config()
    config.apply_dict(cfg, config.load_file(str(path)))
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4 and cfg.train.epochs == 3


def test_a_runs_own_config_json_can_be_fed_back(tmp_path):
    cfg = config.Config()
    cfg.optim.lr, cfg.log.wandb_tags = 3e-4, ["a", "b"]
    config.save(cfg, tmp_path / "config.json")
    again = config.Config()
    config.apply_dict(again, config.load_file(str(tmp_path / "config.json")))
    config.validate(again)
    assert config.to_dict(again) == config.to_dict(cfg)


@pytest.mark.parametrize(
    "name,text",
    [
        ("c.yaml", "train:\n  epochs: 2\n  epochs: 3\n"),
        ("c.yaml", "train:\n  epochs: 2\ntrain:\n  seed: 1\n"),
        ("c.json", '{"train": {"epochs": 2, "epochs": 3}}'),
    ],
)
def test_duplicate_keys_are_an_error(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(config.UserError, match="duplicate key"):
        config.load_file(str(tmp_path / name))


# ---------------------------------------------------------------------------------------- model specs

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
MODULE = st.lists(IDENT, min_size=1, max_size=3).map(".".join)
SPECS = st.one_of(
    st.text(max_size=30),
    st.builds(lambda m, a: f"{m}:{a}", MODULE, IDENT),
    st.builds(lambda p, n: f"{p}:{n}", st.sampled_from(["torchvision", "timm", "python", "code", "os"]), IDENT),
    st.sampled_from(["seed", "resnet18", "airbench", "dist_cnn.models:SeedNet", "dist_cnn.models.registry:seed"]),
)


@settings(max_examples=80, deadline=None)
@given(spec=SPECS)
def test_a_model_spec_read_from_a_file_imports_nothing(spec):
    """Whatever a file names, checking it imports no module outside dist_cnn, and refusing is one line."""
    import sys

    from dist_cnn.errors import UserError
    from dist_cnn.models.trust import check_file_spec, needs_trust

    before = set(sys.modules)
    try:
        check_file_spec(spec, "model.pt")
        allowed = True
    except UserError as e:
        assert "\n" not in str(e) and str(e)
        allowed = False
    assert not {m for m in set(sys.modules) - before if not m.startswith("dist_cnn")}
    if allowed:
        assert not needs_trust(spec)
    else:
        with contextlib.suppress(UserError):  # named on the command line, a module spec passes the check
            check_file_spec(spec, "model.pt", named=spec)


# ---------------------------------------------------------------------------------------- output paths

KINDS = ("missing", "regular", "link-to-regular", "dangling-link", "dir", "link-to-dir", "fifo", "null", "input")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=64))
def test_an_output_path_never_destroys_what_is_there(kind, data):
    """check_output refuses in one line, or write_output leaves every existing node of its kind."""
    import stat

    from dist_cnn.errors import UserError
    from dist_cnn.fileio import check_output, write_output

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "input.jpg").write_bytes(b"image")
        (d / "real").write_bytes(b"old")
        (d / "folder").mkdir()
        path = d / "out"
        {
            "missing": lambda: None,
            "regular": lambda: path.write_bytes(b"old"),
            "link-to-regular": lambda: path.symlink_to(d / "real"),
            "dangling-link": lambda: path.symlink_to(d / "nowhere" / "x"),
            "dir": lambda: path.mkdir(),
            "link-to-dir": lambda: path.symlink_to(d / "folder"),
            "fifo": lambda: os.mkfifo(path),
            "null": lambda: path.symlink_to("/dev/null"),
            "input": lambda: path.symlink_to(d / "input.jpg"),
        }[kind]()
        node = lambda p: stat.S_IFMT(os.lstat(p).st_mode) if os.path.lexists(p) else None  # noqa: E731
        before = {p: node(p) for p in (path, d / "real", d / "input.jpg", d / "folder", "/dev/null")}
        try:
            check_output(str(path), [str(d / "input.jpg")])
        except UserError as e:
            assert "\n" not in str(e) and kind in ("dangling-link", "dir", "link-to-dir", "input")
            assert (d / "input.jpg").read_bytes() == b"image"
            return
        assert kind not in ("dir", "link-to-dir", "input", "dangling-link")
        if kind == "fifo":
            return  # written into by a reader's side: tests/unit/test_reliability_outputs.py
        write_output(str(path), data)
        after = {p: node(p) for p in before}
        changed = {p for p in before if before[p] != after[p]}
        assert changed <= ({path} if kind == "missing" else set()), changed
        if kind in ("missing", "regular"):
            assert path.read_bytes() == data
        if kind == "link-to-regular":
            assert (d / "real").read_bytes() == data and os.path.islink(path)
