"""Hostile study files are bounded: each is one line on stderr, exit code 2, within
200 MB and a few CPU seconds (the `sweeper validate` process, measured here with `wait4`),
and nothing is written.

The bound on time is on the CPU time the process used, five times the 2 s goal: a busy
machine stretches wall time but not the work done, so the test cannot fail for the load
and still catches input that makes sweeper work without end. The wall-time goal itself is
measured by `benchmarks/hostile_inputs.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE = """dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [16]}
budget: {trials: 2, epochs: 1}
"""
MAX_CPU_SECONDS = 10.0  # the goal is 2 s of wall time (benchmarks/hostile_inputs.py)
MAX_MB = 200


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """A YAML list whose aliases expand to width**levels strings (10**9 here)."""
    lines = [f"  - &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def conditional_bomb() -> str:
    """A schema-valid conditional space, each choice's options aliasing one sub-space:
    1.6e8 branches in under 1 kB."""
    nestable = [("model.filter_size", range(1, 11)), ("model.pool", range(1, 5)),
                ("model.blocks", range(1, 5)), ("dataset.augment.shift", range(10)),
                ("train.batch_size", range(1, 11)), ("train.eval_batch_size", range(1, 11)),
                ("train.seed", range(10)), ("dataset.seed", range(10)),
                ("model.width", range(4, 14))]

    def nest(level: int) -> str:
        if level == len(nestable):
            return "{train.lr: {float: [0.001, 0.1]}}"
        key, (first, *rest) = nestable[level][0], nestable[level][1]
        options = [f"{first}: &l{level} {nest(level + 1)}", *(f"{v}: *l{level}" for v in rest)]
        return f"{{{key}: {{choice: {{{', '.join(options)}}}}}}}"

    return f"space: {nest(0)}\n"


def choice_of(n: int) -> str:
    return "space:\n  train.seed: {choice: [" + ", ".join(map(str, range(n))) + "]}\n"


HOSTILE = {
    "alias-bomb-name": ("name:\n" + billion_laughs() + BASE, "aliases (*name) are expanded"),
    "alias-bomb-description": ("name: bomb\ndescription:\n" + billion_laughs() + BASE,
                               "aliases (*name) are expanded"),
    "alias-bomb-conditional-space": ("name: bomb\n" + BASE + conditional_bomb(),
                                     "aliases (*name) are expanded"),
    "recursive-alias": ("name: loop\n" + BASE + "space: &s {train.lr: *s}\n",
                        "refers to the value that contains it"),
    "50MB-description": (lambda: "name: big\ndescription: " + "x" * 50_000_000 + "\n" + BASE,
                         "a study file may be at most 1,048,576 bytes"),
    "long-description": ("name: long\ndescription: " + "x" * 20_000 + "\n" + BASE,
                         "description: string should have at most 10000 characters"),
    "choice-of-10k": ("name: wide\n" + BASE + choice_of(10_000),
                      "a choice of 10,000 options; at most 1,000"),
    "choice-of-40k": ("name: wide\n" + BASE + choice_of(40_000), "more than 20,000 values"),
    "choice-of-2M": (lambda: "name: wide\n" + BASE + choice_of(2_000_000),
                     "a study file may be at most"),
    "deep-nesting": ("name: deep\n" + BASE + "description: " + "[" * 5000 + "]" * 5000 + "\n",
                     "nests deeper than"),
    "nesting-beyond-64": ("name: deep\n" + BASE + "description: " + "[" * 70 + "]" * 70 + "\n",
                          "nests deeper than 64 levels"),
    "name-trailing-newline": ('name: "bad\\n"\n' + BASE, "name: a study name is 1-100"),
    "val-fraction-leaves-one-image": (
        "name: tiny\n" + BASE.replace("synthetic,", "synthetic, val_fraction: 0.999999,"),
        "dataset.val_fraction: the training split holds 1 image(s)"),
    "seed-beyond-numpy": ("name: seed\n" + BASE + "train: {seed: 1" + "0" * 30 + "}\n",
                          "train.seed: input should be less than or equal to 4294967295"),
    "negative-sampler-seed": ("name: seed\n" + BASE + "sampler: {seed: -1}\n",
                              "sampler.seed: input should be greater than or equal to 0"),
    "seed-bound-in-space": ("name: seed\n" + BASE + "space:\n  train.seed: {int: [0, 1"
                            + "0" * 30 + "]}\n",
                            "is not valid for train.seed"),
}


# A small interpreter starts the command and reports its own child's time and peak RSS
# (`wait4`): a child forked from pytest itself would count pytest's memory as its own.
_MEASURE = """
import json, os, subprocess, sys, time
start = time.monotonic()
child = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "validate", sys.argv[1]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = child.stderr.read(100_000)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), err.decode(),
                  usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]))
"""


def measured(target: str, cwd: Path) -> tuple[int, str, float, float]:
    """(exit code, stderr, CPU seconds, peak RSS in MB) of `sweeper validate target`."""
    import json

    done = subprocess.run([sys.executable, "-c", _MEASURE, target], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    code, err, seconds, peak = json.loads(done.stdout)
    return code, err, seconds, peak


def assert_bounded(target: str, cwd: Path, expected: str) -> None:
    before = set(cwd.rglob("*"))
    code, stderr, cpu_seconds, peak_mb = measured(target, cwd)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and expected in lines[0], stderr
    assert cpu_seconds <= MAX_CPU_SECONDS, f"{cpu_seconds:.2f} s of CPU"
    assert peak_mb <= MAX_MB, f"{peak_mb:.0f} MB"
    assert set(cwd.rglob("*")) == before, "something was written"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_study_file_is_one_line_fast_and_small(tmp_path: Path, case: str) -> None:
    text, expected = HOSTILE[case]
    path = tmp_path / "study.yaml"
    path.write_text(text() if callable(text) else text)  # the big ones written, then freed
    assert_bounded(str(path), tmp_path, expected)


def test_fifo_is_refused_without_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "study.yaml")  # no writer: a plain open() would block forever
    assert_bounded(str(tmp_path / "study.yaml"), tmp_path, "is not a regular file")


def test_dev_zero_is_refused_without_reading(tmp_path: Path) -> None:
    assert_bounded("/dev/zero", tmp_path, "is not a regular file")
