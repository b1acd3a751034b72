"""Every benchmark (`make bench`): each bench/bench_*.py module with its default arguments, one
after the other, each in its own process (so one's memory peak or thread pool does not colour the
next). Their tables go to stdout; BENCHMARKS.md records them with the command, machine and date.

    python -m bench.run [--only train memory ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def modules() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=modules(), help="run only these benchmarks")
    args = ap.parse_args(argv)
    failed = []
    for name in args.only or modules():
        print(f"\n## bench_{name}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", f"bench.bench_{name}"], cwd=BENCH.parent).returncode
        print(f"\n(bench_{name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
