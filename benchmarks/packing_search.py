"""Search quality with trial packing: the same study and budget, `pack: 1` against
`pack: K`, over several sampler seeds.

Each (seed, pack) pair runs the study file (default `studies/quickstart.yaml`: TPE over
lr, dropout and filter size of a small ConvNet, 6 trials of 3 epochs, median pruner) into
a fresh SQLite storage without tracking, with `sampler.seed` set to the seed. Printed per
run: the best validation accuracy, the wall time, the load average, and how the trials
spread over the shape params (with packing, the K-1 trials after the first of a pack take
its shape; see the README's "Trial packing").

    SWEEPER_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.packing_search \\
        [--file studies/quickstart.yaml] [--pack 4] [--seeds 0,1,2] [--subset N]
        [--epochs N] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna

from sweeper.search.packed_trials import member_params
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _parse()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"search quality: {args.file.name}, pack 1 vs {args.pack}, seeds {args.seeds}")
    print(f"load average before: {_load()}")
    best: dict[int, list[float]] = {1: [], args.pack: []}
    seconds: dict[int, list[float]] = {1: [], args.pack: []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for pack in (1, args.pack):
            spec = config.load(args.file)
            spec.name = f"{spec.name}-s{seed}-p{pack}"
            spec.sampler.seed = seed
            spec.pack = pack
            if args.subset is not None:
                spec.dataset.subset = args.subset
            if args.epochs is not None:
                spec.budget.epochs = args.epochs
            storage = f"sqlite:///{tempfile.mkdtemp()}/optuna.db"
            started = time.perf_counter()
            report = run_study(spec, RunOptions(storage=storage, device=args.device))
            elapsed = time.perf_counter() - started
            study = report.study
            complete = [t for t in study.trials if t.value is not None]
            value = max(t.value for t in complete) if complete else float("nan")
            best[pack].append(value)
            seconds[pack].append(elapsed)
            shape = sorted(set(study.trials[0].params) - member_params(spec))
            spread = Counter(tuple(t.params.get(k) for k in shape) for t in study.trials)
            states = Counter(t.state.name for t in study.trials)
            print(f"seed {seed} pack {pack}: best val_accuracy {value:.4f}, {elapsed:6.1f} s, "
                  f"{dict(states)}, shapes {dict(spread)} ({', '.join(shape)}), "
                  f"load {_load()}", flush=True)
    for pack in (1, args.pack):
        print(f"pack {pack}: best val_accuracy mean {statistics.mean(best[pack]):.4f} "
              f"(per seed {', '.join(f'{v:.4f}' for v in best[pack])}), wall time mean "
              f"{statistics.mean(seconds[pack]):.1f} s")
    print(f"load average after: {_load()}")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=REPO / "studies" / "quickstart.yaml")
    parser.add_argument("--pack", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--subset", type=int, default=None, help="override dataset.subset")
    parser.add_argument("--epochs", type=int, default=None, help="override budget.epochs")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


if __name__ == "__main__":
    main()
