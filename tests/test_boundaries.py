"""The walls of the module map (DESIGN §3), checked by parsing imports with `ast`, and the
lazy imports that keep `sweeper --help` and `sweeper validate` instant."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sweeper"

# module -> packages it must never import (at any depth of the file); modules not written
# yet join the check as soon as their file exists.
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"torch", "torchvision", "optuna", "mlflow", "sklearn"},
    "config": {"torch", "torchvision", "optuna", "mlflow"},
    "shapes": {"torch", "torchvision", "optuna", "mlflow"},
    "space": {"torch", "torchvision", "mlflow"},
    "data": {"optuna", "mlflow"},
    "models": {"optuna", "mlflow", "torchvision", "sweeper.data"},
    "train": {"optuna", "mlflow"},
    "packing": {"optuna", "mlflow"},
    "packed_trials": {"mlflow"},
    "transfer": {"optuna", "mlflow"},
    "rerun": {"mlflow"},
    "evaluate": {"optuna", "mlflow"},
    "plots": {"mlflow", "torch"},
    "images": {"mlflow", "torch", "optuna", "plotly"},
    "study": {"mlflow"},
    "results": {"mlflow", "sweeper.train"},
    "scoring": {"mlflow", "optuna"},
    "report": {"torch", "mlflow", "sweeper.train"},
    "views": {"torch", "optuna", "mlflow"},
}
# The one package that may import mlflow.
MLFLOW_OWNER = "tracking"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _matches(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


@pytest.mark.parametrize("module", sorted(m for m in FORBIDDEN
                                          if (PACKAGE / f"{m}.py").exists()))
def test_module_keeps_its_walls(module: str) -> None:
    path = PACKAGE / f"{module}.py"
    found = {name for name in imports_of(path) for banned in FORBIDDEN[module]
             if _matches(name, banned)}
    assert not found, f"sweeper/{module}.py imports {sorted(found)}"


def test_only_tracking_imports_mlflow() -> None:
    modules = list(PACKAGE.rglob("*.py"))
    assert any(p.parent.name == MLFLOW_OWNER for p in modules)
    offenders = [str(p.relative_to(PACKAGE)) for p in modules
                 if p.parent.name != MLFLOW_OWNER
                 and any(_matches(n, "mlflow") for n in imports_of(p))]
    assert not offenders, f"only sweeper/{MLFLOW_OWNER}/ may import mlflow: {offenders}"



@pytest.mark.parametrize("argv, heavy", [
    (["--help"], ("torch", "optuna", "mlflow", "sklearn")),
    (["validate", "studies/mnist_arch.yaml"], ("torch", "mlflow", "sklearn")),
])
def test_cli_start_is_light(argv: list[str], heavy: tuple[str, ...]) -> None:
    code = ("import sys\n"
            "from sweeper.cli import app\n"
            f"sys.argv = ['sweeper', *{argv!r}]\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
            "print('LOADED', loaded)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, check=False)
    assert "LOADED []" in result.stdout, result.stdout + result.stderr
