"""Host memory of a pack on the CPU, measured, next to `packing.member_bytes`' estimate.

`pack_size` packs as many members as fit in half the free memory by `member_bytes`. This
script checks that estimate against what a pack really takes: for each network (as in
`benchmarks/packing.py`) and K = 1, 2, 4, 8, a fresh process loads the data, builds K
models, resets its peak resident size (`/proc/self/clear_refs`), trains the pack for one
epoch and reads the peak (`VmHWM`). The growth over the resident size before training is
the pack's memory; the estimate should stay above it.

    PYTHONPATH=. .venv/bin/python -m benchmarks.packing_memory [--archs cnn,lenet,mlp]
        [--train-images 2048] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKS = (1, 2, 4, 8)

CHILD = """
import json, sys
from benchmarks.packing import _data, _parse, _trials
from sweeper.ml.models import build_model
from sweeper.ml.packing import fit_packed, keep_freed_memory, member_bytes
from sweeper.ml.train import resolve_device, seed_everything

arch, k = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]
args = _parse()
device = resolve_device("cpu")
data, _ = _data(args, device)
configs = _trials(arch, args)[:k]
models = []
for config in configs:
    seed_everything(config.train.seed)
    models.append(build_model(config.model, data.input_shape, data.num_classes))
keep_freed_memory()


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from here
before = status("VmRSS:")
fit_packed(models, configs, data, device=device)
print(json.dumps({"measured": status("VmHWM:") - before,
                  "estimate": k * member_bytes(configs[0], data.input_shape,
                                               data.num_classes)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="cnn,lenet,mlp,mlp-small")
    parser.add_argument("--train-images", default="2048")
    parser.add_argument("--batch-size", default="128")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"pack memory on the CPU (one epoch, {args.train_images} images, batch "
          f"{args.batch_size}); load average {_load()}")
    print(f"{'network':9} {'K':>2} {'measured MiB':>12} {'estimate MiB':>12} {'ratio':>6}")
    for arch in args.archs.split(","):
        for k in PACKS:
            result = subprocess.run(
                [sys.executable, "-c", CHILD, arch, str(k), "--train-images",
                 args.train_images, "--batch-size", args.batch_size],
                env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise SystemExit(result.stderr)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            measured, estimate = row["measured"] / 2**20, row["estimate"] / 2**20
            print(f"{arch:9} {k:>2} {measured:12.1f} {estimate:12.1f} "
                  f"{estimate / max(measured, 1e-9):5.1f}x", flush=True)
    print(f"load average after: {_load()}")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


if __name__ == "__main__":
    main()
