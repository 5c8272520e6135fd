"""Hostile study files and secret-bearing URLs against a `sweeper` executable: for each
probe, the exit code, wall time, peak memory (RSS of the command and its children) and the
first line it printed. Prints a markdown table.

    python benchmarks/hostile_inputs.py [--sweeper PATH] [--limit-s 20] [--limit-mb 3000]

Each probe runs in a fresh temporary folder under a hard cap (`--limit-s` seconds,
`--limit-mb` of address space), so that an unbounded version cannot take the machine down;
"killed" in the table means it hit the cap. The goal (issue 10): exit 2 with one line in
<= 2 s and <= 200 MB, nothing written.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BASE = """dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [16]}
budget: {trials: 2, epochs: 1}
"""


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """A YAML value whose aliases expand to width**levels strings."""
    lines = [f"  - &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


# Keys the space may nest, each with options that are valid values for it.
_NESTABLE = [("model.filter_size", range(1, 11)), ("model.pool", range(1, 5)),
             ("model.blocks", range(1, 5)), ("dataset.augment.shift", range(10)),
             ("train.batch_size", range(1, 11)), ("train.eval_batch_size", range(1, 11)),
             ("train.seed", range(10)), ("dataset.seed", range(10)),
             ("model.width", range(4, 14))]


def conditional_bomb() -> str:
    """A schema-valid conditional space: each choice's options alias one sub-space, so the
    space has 1.6e8 branches in a few hundred bytes."""
    def nest(level: int) -> str:
        if level == len(_NESTABLE):
            return "{train.lr: {float: [0.001, 0.1]}}"
        key, values = _NESTABLE[level]
        first, *rest = values
        options = [f"{first}: &l{level} {nest(level + 1)}", *(f"{v}: *l{level}" for v in rest)]
        return f"{{{key}: {{choice: {{{', '.join(options)}}}}}}}"

    return f"space: {nest(0)}\n"


def probes(tmp: Path) -> dict[str, tuple[list[str], Path | None]]:
    """name -> (argv after `sweeper`, study file written for it)."""
    files: dict[str, str] = {
        "alias bomb in name": "name:\n" + billion_laughs() + BASE,
        "alias bomb in description": "name: bomb\ndescription:\n" + billion_laughs() + BASE,
        "alias bomb in conditional space": "name: bomb\n" + BASE + conditional_bomb(),
        "50 MB description": "name: big\ndescription: " + "x" * 50_000_000 + "\n" + BASE,
        "choice of 10k options": "name: wide\n" + BASE + "space:\n  train.lr: {choice: ["
                                 + ", ".join(f"{0.001 + i * 1e-7:.7f}" for i in range(10_000))
                                 + "]}\n",
        "choice of 40k options": "name: wide\n" + BASE + "space:\n  train.seed: {choice: ["
                                 + ", ".join(str(i) for i in range(40_000)) + "]}\n",
        "choice of 2M options": "name: wide\n" + BASE + "space:\n  train.seed: {choice: ["
                                + ", ".join(str(i) for i in range(2_000_000)) + "]}\n",
        "name with a trailing newline": 'name: "bad\\n"\n' + BASE,
        "val_fraction 0.999999": "name: tiny\n" + BASE.replace(
            "synthetic,", "synthetic, val_fraction: 0.999999,"),
        "train.seed 1e30": "name: seed\n" + BASE + "train: {seed: 1" + "0" * 30 + "}\n",
    }
    out: dict[str, tuple[list[str], Path | None]] = {}
    for name, text in files.items():
        path = tmp / (name.replace(" ", "_").replace("/", "_") + ".yaml")
        path.write_text(text)
        out[name] = (["validate", str(path)], path)
    fifo = tmp / "fifo.yaml"
    os.mkfifo(fifo)
    out["a FIFO as the study file"] = (["validate", str(fifo)], None)
    out["/dev/zero as the study file"] = (["validate", "/dev/zero"], None)
    out["?password= in a storage URL"] = (
        ["studies", "--storage",
         "postgresql://alice@127.0.0.1:1/optuna?password=s3cret-in-query"], None)
    return out


def run(argv: list[str], cwd: Path, limit_s: float, limit_mb: int) -> dict[str, object]:
    def cap() -> None:
        limit = limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=cap, start_new_session=True)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read(200_000)))
    reader.start()
    waited: dict[str, object] = {}

    def wait() -> None:  # wait4: this child's own peak RSS (children it waited for too)
        _, status, usage = os.wait4(process.pid, 0)
        waited["status"], waited["usage"] = status, usage

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiter.join(limit_s)
    killed = waiter.is_alive()
    if killed:
        os.killpg(process.pid, 9)
        waiter.join()
    seconds = time.monotonic() - start
    reader.join(5)
    process.returncode = 0  # reaped by wait4 above
    code = os.waitstatus_to_exitcode(waited["status"])  # type: ignore[arg-type]
    text = b"".join(output).decode("utf-8", "replace").strip()
    lines = text.splitlines()
    return {"code": "killed" if killed else code, "seconds": seconds,
            "peak_mb": waited["usage"].ru_maxrss / 1024,  # type: ignore[attr-defined]
            "lines": len(lines), "first": lines[0][:110] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeper", default=str(Path(sys.executable).with_name("sweeper")))
    parser.add_argument("--limit-s", type=float, default=20.0)
    parser.add_argument("--limit-mb", type=int, default=3000)
    parser.add_argument("--only", default="", help="run the probes whose name has this")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().strip()
    print(f"sweeper: {args.sweeper}; load average: {load}")
    print("| probe | exit | time (s) | peak RSS (MB) | lines | written | first line |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="sweeper-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        for name, (argv, _) in probes(tmp).items():
            if args.only not in name:
                continue
            cwd = tmp / "cwd"
            cwd.mkdir()
            result = run([args.sweeper, *argv], cwd, args.limit_s, args.limit_mb)
            written = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
            peak = f"{result['peak_mb']:.0f}"
            first = str(result["first"]).replace("|", "\\|")
            print(f"| {name} | {result['code']} | {result['seconds']:.2f} | {peak} | "
                  f"{result['lines']} | {', '.join(written)[:40] or '-'} | {first} |",
                  flush=True)
            for path in sorted(cwd.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            cwd.rmdir()


if __name__ == "__main__":
    main()
