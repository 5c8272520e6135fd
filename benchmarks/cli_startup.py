"""How fast the CLI answers: `sweeper --help` and `sweeper validate` (floor: <= 0.5 s each).

    python benchmarks/cli_startup.py [--repeat 10]

Each command runs as a fresh process (what a user types), several times; the table shows
the median and best wall time, and which heavy modules each command imported (torch,
optuna and mlflow must load only when a command needs them).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR_S = 0.5
COMMANDS = {
    "sweeper --help": ["--help"],
    "sweeper validate studies/mnist_arch.yaml": ["validate", "studies/mnist_arch.yaml"],
    "sweeper validate studies/mnist_cnn.yaml": ["validate", "studies/mnist_cnn.yaml"],
}
PROBE = ("import sys, runpy\n"
         "sys.argv = ['sweeper', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('sweeper.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "heavy = [m for m in ('torch', 'optuna', 'mlflow', 'sklearn') if m in sys.modules]\n"
         "print('HEAVY', ','.join(heavy) or '-', file=sys.stderr)\n")


def time_command(argv: list[str], repeat: int) -> tuple[list[float], str]:
    times: list[float] = []
    heavy = "?"
    for _ in range(repeat):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "sweeper.cli", *argv], cwd=REPO,
                                capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{argv} failed: {result.stderr}")
    probe = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO,
                           capture_output=True, text=True, check=False)
    for line in probe.stderr.splitlines():
        if line.startswith("HEAVY "):
            heavy = line.removeprefix("HEAVY ")
    return times, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    baseline, _ = time_command_python(args.repeat)
    print(f"{'command':<45} {'median':>8} {'best':>8}  heavy modules loaded")
    print(f"{'python -c pass (interpreter alone)':<45} {statistics.median(baseline):>7.3f}s "
          f"{min(baseline):>7.3f}s")
    worst = 0.0
    for label, argv in COMMANDS.items():
        times, heavy = time_command(argv, args.repeat)
        median = statistics.median(times)
        worst = max(worst, median)
        print(f"{label:<45} {median:>7.3f}s {min(times):>7.3f}s  {heavy}")
    verdict = "meets" if worst <= FLOOR_S else "MISSES"
    print(f"slowest median: {worst:.3f}s ({verdict} the floor of {FLOOR_S}s)")


def time_command_python(repeat: int) -> tuple[list[float], str]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    return times, "-"


if __name__ == "__main__":
    main()
