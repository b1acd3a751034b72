"""The `fot` command and every documented command line: each answers --help (no command is
documented that does not run), and a bad command gets one clear error."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from fot import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_modules() -> set[str]:
    return {m for p in DOCS for m in re.findall(r"python -m ((?:fot|experiments|bench)[\w.]*)", p.read_text())}


def has_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def test_console_script_lists_every_command():
    exe = Path(sys.executable).with_name("fot")
    assert exe.is_file(), "the `fot` console script is not installed (pip install -e .)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in cli.COMMANDS:
        assert f"fot {name} " in out.stdout


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_answers_help(name, capsys):
    if name == "eval harness" and not has_lm_eval():
        pytest.skip("lm-eval is the optional extra .[eval]")
    with pytest.raises(SystemExit) as e:
        cli.main([*name.split(), "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_documented_modules_answer_help(monkeypatch, capsys):
    modules = documented_modules()
    assert {"fot.train", "fot.eval.passkey", "fot.experiments.sweep"} <= modules  # the scan finds them
    for module in sorted(modules):
        monkeypatch.setattr(sys, "argv", [module, "--help"])
        with pytest.raises(SystemExit) as e:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        assert e.value.code == 0, module
        assert "usage:" in capsys.readouterr().out, module


def test_documented_fot_commands_resolve():
    for p in DOCS:
        for line in re.findall(r"^\s*fot (\w[^\n#`]*)", p.read_text(), re.M):
            name, _ = cli.resolve(line.split())
            assert name in cli.COMMANDS


def test_subcommand_is_the_module(monkeypatch):
    seen = {}
    monkeypatch.setattr("fot.eval.passkey.main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["eval", "passkey", "MODEL", "--lengths", "1k"]) == 0
    assert seen["argv"] == ["MODEL", "--lengths", "1k"]


@pytest.mark.parametrize("argv, words", [(["trian"], "unknown command 'trian'"),
                                         (["eval"], "`fot eval` needs one of: passkey, needle"),
                                         (["eval", "pasky"], "`fot eval` needs one of")])
def test_bad_command_is_one_clear_error(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
