"""``p2pml run`` options from P2PML_* variables and a --config TOML file; --print-config.

Everything here stops at --print-config or at a bad value, so nothing trains and torch is not
loaded (except by the one test that trains under --time-budget, marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import typer.main

from p2pml.cli import app, main
from p2pml.cli.config import env_var

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No P2PML_* variable of the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("P2PML_") and name != "P2PML_TEST_SEED":
            monkeypatch.delenv(name)


def resolved(capsys, *args):
    """Run ``p2pml run ARGS --print-config``; return {key: (value, source)} of the output."""
    assert main(["run", *args, "--print-config"]) == 0
    out = capsys.readouterr().out
    values = tomllib.loads(out)["run"]
    sources = {}
    for line in out.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, _, comment = line.partition(" = ")
        sources[key] = comment.rsplit("  # ", 1)[1]
    return {key: (value, sources[key]) for key, value in values.items()}


def one_line_error(capsys, *args):
    """Run ``p2pml run ARGS``; it must fail with exit 2 and one line on stderr: return it."""
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def write(tmp_path, text, name="p2pml.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_options():
    command = typer.main.get_command(app).commands["run"]
    return [p for p in command.params if getattr(p, "opts", None) and p.opts[0].startswith("--")]


def test_config_every_run_option_has_its_env_var():
    options = {p.opts[0]: p.envvar for p in run_options()}
    assert options.pop("--print-config") is None  # no environment can stop a node from starting
    for flag, envvar in options.items():
        assert envvar == "P2PML_" + flag[2:].upper().replace("-", "_"), flag
    assert {"--barrier", "--http-listen", "--log", "--bootstrap", "--time-budget"} <= set(options)


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--barrier", "P2PML_BARRIER"),
        ("--http-listen", "P2PML_HTTP_LISTEN"),
        ("--log", "P2PML_LOG"),
        ("--config", "P2PML_CONFIG"),
    ],
)
def test_config_env_var_names_follow_the_flag(flag, expected):
    assert env_var(flag) == expected


# flag, key in the file, TOML value in the file, env value, command line, and the value each
# source (file, env, flag, default) gives
PRECEDENCE = [
    ("--barrier", "barrier", '"bsp"', "asp", ["--barrier", "ssp"], ("bsp", "asp", "ssp", "pssp")),
    ("--staleness", "staleness", "1", "2", ["--staleness", "3"], (1, 2, 3, 4)),
    ("--lr", "lr", "0.5", "0.25", ["--lr", "0.125"], (0.5, 0.25, 0.125, 0.05)),
    (
        "--http-listen",
        "http_listen",
        '"127.0.0.1:1"',
        "127.0.0.1:2",
        ["--http-listen", "127.0.0.1:3"],
        ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", None),
    ),
    (
        "--log",
        "log",
        '"f.jsonl"',
        "e.jsonl",
        ["--log", "l.jsonl"],
        ("f.jsonl", "e.jsonl", "l.jsonl", "-"),
    ),
    ("--quiet", "quiet", "true", "0", ["--no-quiet"], (True, False, False, False)),
    (
        "--max-contacts-per-ip",
        "max-contacts-per-ip",
        "5",
        "6",
        ["--max-contacts-per-ip", "7"],
        (5, 6, 7, 3),
    ),
    (
        "--aggregate",
        "aggregate",
        '"median"',
        "trimmed_mean",
        ["--aggregate", "centered_clip"],
        ("median", "trimmed_mean", "centered_clip", "mean"),
    ),
]


@pytest.mark.parametrize(("flag", "key", "in_file", "in_env", "on_line", "values"), PRECEDENCE)
@pytest.mark.parametrize("given", ["none", "file", "file+env", "file+env+flag", "env+flag"])
def test_config_precedence_is_flag_then_env_then_file_then_default(
    flag, key, in_file, in_env, on_line, values, given, tmp_path, monkeypatch, capsys
):
    args = []
    if "file" in given:
        args += ["--config", str(write(tmp_path, f"[run]\n{key} = {in_file}\n"))]
    if "env" in given:
        monkeypatch.setenv(env_var(flag), in_env)
    if "flag" in given:
        args += on_line
    winner = given.split("+")[-1] if given != "none" else "default"
    value, source = resolved(capsys, *args).get(flag[2:], (None, "default"))
    assert value == values[("file", "env", "flag", "default").index(winner)]
    assert source == (f"env {env_var(flag)}" if winner == "env" else winner)


def test_config_file_top_level_keys_apply_and_the_command_table_overrides_them(tmp_path, capsys):
    path = write(
        tmp_path,
        'barrier = "bsp"\nsteps = 7\n[run]\nsteps = 9\n',
    )
    seen = resolved(capsys, "--config", str(path))
    assert seen["barrier"] == ("bsp", "file")
    assert seen["steps"] == (9, "file")


def test_config_file_keys_may_use_dashes_or_underscores(tmp_path, capsys):
    path = write(tmp_path, '[run]\nrun_id = "a"\nbatch-size = 8\nmin_peers = 2\n')
    seen = resolved(capsys, "--config", str(path))
    assert (seen["run-id"], seen["batch-size"], seen["min-peers"]) == (
        ("a", "file"),
        (8, "file"),
        (2, "file"),
    )


def test_config_file_integer_is_accepted_for_a_string_option(tmp_path, capsys):
    path = write(tmp_path, "[run]\nsample = 3\n")
    assert resolved(capsys, "--config", str(path))["sample"] == ("3", "file")


def test_config_file_is_found_through_p2pml_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("P2PML_CONFIG", str(write(tmp_path, "[run]\nseed = 11\n")))
    assert resolved(capsys)["seed"] == (11, "file")


def test_config_print_round_trips_through_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("P2PML_FANOUT", "3")
    first_file = write(tmp_path, '[run]\nmodel = "cnn"\nkey = "node.key"\n', "first.toml")
    args = ["--config", str(first_file), "--log", 'odd "log" \\ é\tx', "--quiet"]
    assert main(["run", *args, "--max-delta-age", "2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    monkeypatch.delenv("P2PML_FANOUT")
    again = write(tmp_path, printed, "printed.toml")
    assert main(["run", "--config", str(again), "--print-config"]) == 0
    reprinted = capsys.readouterr().out
    assert tomllib.loads(reprinted) == tomllib.loads(printed)
    assert tomllib.loads(printed)["run"]["fanout"] == 3


def test_config_print_starts_nothing_and_writes_nothing(tmp_path, capsys):
    log, save = tmp_path / "steps.jsonl", tmp_path / "model.p2pml"
    resolved(capsys, "--log", str(log), "--save", str(save))
    assert not log.exists() and not save.exists()


def test_config_print_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from p2pml.cli import main\n"
        "status = main(['run', '--print-config'])\n"
        "print('torch' in sys.modules, status)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PML_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.stdout.splitlines()[-1] == "False 0", done.stderr


def test_config_print_checks_the_values_first(monkeypatch, capsys):
    monkeypatch.setenv("P2PML_ROLE", "worker")  # --role worker needs --server
    line = one_line_error(capsys, "--print-config")
    assert "--server" in line


def test_config_malformed_toml_is_one_line_with_the_file_and_line(tmp_path, capsys):
    path = write(tmp_path, '[run]\nbarrier = "ssp"\nsteps = = 3\n')
    line = one_line_error(capsys, "--config", str(path))
    assert "--config" in line and str(path) in line and "line 3" in line


def test_config_unknown_key_is_named_with_a_suggestion(tmp_path, capsys):
    path = write(tmp_path, "[run]\nstalness = 2\n")
    line = one_line_error(capsys, "--config", str(path))
    assert str(path) in line and "'stalness'" in line and "'staleness'" in line


def test_config_unknown_table_is_refused(tmp_path, capsys):
    path = write(tmp_path, "[rnu]\nsteps = 2\n")
    assert "[rnu]" in one_line_error(capsys, "--config", str(path))


@pytest.mark.parametrize("key", ["config", "print-config", "print_config"])
def test_config_file_cannot_set_the_config_options(key, tmp_path, capsys):
    path = write(tmp_path, f'[run]\n{key} = "x"\n')
    assert repr(key) in one_line_error(capsys, "--config", str(path))


def test_config_key_given_twice_is_refused(tmp_path, capsys):
    path = write(tmp_path, '[run]\nrun_id = "a"\nrun-id = "b"\n')
    assert "twice" in one_line_error(capsys, "--config", str(path))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('staleness = "four"', "an integer"),
        ("steps = true", "an integer"),
        ("steps = 1.5", "an integer"),
        ('lr = "fast"', "a number"),
        ("lr = false", "a number"),
        ("quiet = 1", "a boolean"),
        ('listen = ["127.0.0.1:0"]', "a string"),
        ("key = 3", "a path"),
        ("barrier = { name = 'ssp' }", "a string"),
    ],
)
def test_config_value_of_the_wrong_type_is_refused(entry, expected, tmp_path, capsys):
    path = write(tmp_path, f"[run]\n{entry}\n")
    line = one_line_error(capsys, "--config", str(path))
    key = entry.split(" =")[0]
    assert str(path) in line and repr(key) in line and expected in line


def test_config_missing_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "absent.toml"
    line = one_line_error(capsys, "--config", str(path))
    assert str(path) in line and "no such file" in line


def test_config_folder_is_refused(tmp_path, capsys):
    assert "folder" in one_line_error(capsys, "--config", str(tmp_path))


def test_config_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[run]\nrun_id = "caf\xe9"\n')
    assert "UTF-8" in one_line_error(capsys, "--config", str(path))


def test_config_missing_file_from_the_environment_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("P2PML_CONFIG", str(tmp_path / "absent.toml"))
    assert "P2PML_CONFIG" in one_line_error(capsys, "--print-config")


@pytest.mark.parametrize(
    ("name", "value", "flag"),
    [
        ("P2PML_BARRIER", "fastest", "--barrier"),
        ("P2PML_STEPS", "0", "--steps"),
        ("P2PML_STEPS", "many", "--steps"),
        ("P2PML_TIME_BUDGET", "-1", "--time-budget"),
        ("P2PML_LISTEN", "localhost:1", "--listen"),
        ("P2PML_QUIET", "maybe", "--quiet"),
    ],
)
def test_config_bad_value_from_the_environment_names_flag_and_variable(
    name, value, flag, monkeypatch, capsys
):
    monkeypatch.setenv(name, value)
    line = one_line_error(capsys, "--print-config")
    assert flag in line and name in line


def test_config_bad_value_from_the_file_names_flag_and_file(tmp_path, capsys):
    path = write(tmp_path, "[run]\nsteps = 0\n")
    line = one_line_error(capsys, "--config", str(path))
    assert "--steps" in line and str(path) in line


def test_config_bad_value_on_the_line_does_not_blame_env_or_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("P2PML_BARRIER", "ssp")
    line = one_line_error(capsys, "--barrier", "fastest")
    assert "--barrier" in line and "P2PML_BARRIER" not in line and "from" not in line


@pytest.mark.parametrize(
    "args",
    [
        ["--time-budget", "-1"],
        ["--time-budget", "inf"],
        ["--time-budget", "nan"],
        ["--time-budget", "5", "--role", "server"],
    ],
)
def test_run_time_budget_is_checked(args, capsys):
    assert "--time-budget" in one_line_error(capsys, *args)


@pytest.mark.slow  # loads torch and trains for a moment
def test_run_time_budget_stops_training_before_steps(tmp_path, capsys):
    log = tmp_path / "steps.jsonl"
    args = ["--dataset", "iris", "--steps", "1000000", "--batch-size", "8", "--eval-every", "0"]
    status = main(["run", *args, "--time-budget", "0.5", "--log", str(log), "--quiet"])
    assert status == 0, capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert 0 < len(steps) < 1000000
