"""What every result records about how it was made: the exact command, machine, date, git commit."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from fot.eval import report


def git_info(root: Path | None = None) -> dict[str, Any]:
    """The commit of this checkout and whether it has uncommitted changes (None outside git). The
    results folder is left out: other runs write their outputs there while this one runs."""
    root = root or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".", ":(exclude)experiments/results")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def run_meta(module: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """report.run_info() and git_info(), with the command as `python -m module ARGV` (argv: what main()
    parsed; None = sys.argv[1:]), also when main() is called from Python."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([Path(sys.executable).name, "-m", module, *args])
    return {**report.run_info(), "command": command, "argv": args, **git_info()}
