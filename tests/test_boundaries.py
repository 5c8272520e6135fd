"""The walls of the module map (DESIGN §3), checked for every module by parsing its imports
with `ast` (at any depth of the file: a lazy import inside a function is still knowledge),
and the lazy imports that keep `sweeper --help` and `sweeper validate` instant.

`FOLDERS` is the one table: every module of the package is listed under its folder, and
each folder says what its modules must not import; `EXTRA` adds a few walls that only one
module keeps. A module on disk that the table does not list fails, and so does a listed
module that no longer exists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sweeper"

HEAVY = {"torch", "torchvision", "optuna", "mlflow", "sklearn", "plotly", "matplotlib",
         "sqlalchemy"}
FOLDER_NAMES = ("spec", "ml", "search", "fleet", "tracking", "results", "render")


def inner(*names: str) -> set[str]:
    return {f"sweeper.{name}" for name in names}


# folder -> (its modules, what they must never import)
FOLDERS: dict[str, tuple[tuple[str, ...], set[str]]] = {
    # The top: the lazy public API, the CLI, and leaves every folder may use.
    "": (("__init__", "cli", "errors", "keys", "uris", "redaction", "serving"),
         {"mlflow", "sklearn"}),
    # The study file: no torch, optuna or mlflow (`sweeper validate` stays instant).
    "spec": (("__init__", "config", "space", "shapes"),
             HEAVY | inner("ml", "search", "fleet", "tracking", "results", "render", "cli")),
    # The machine learning: no optuna, no mlflow; it knows nothing of what drives it.
    "ml": (("__init__", "data", "device", "models", "transfer", "train", "metrics",
            "modelfile", "packing"),
           {"optuna", "mlflow", "plotly", "sqlalchemy"}
           | inner("search", "fleet", "tracking", "results", "render", "cli", "serving")),
    # Optuna and the worker loop: no MLflow calls (the tracker is handed in), no output.
    "search": (("__init__", "storage", "sqlite", "retrying", "samplers", "queries",
                "endings", "stopping_rules", "study", "packed_trials"),
               {"mlflow", "plotly"} | inner("tracking", "results", "render", "cli")),
    # Many workers: no training, no MLflow internals.
    "fleet": (("__init__", "heartbeat", "jobs", "liveness", "reap", "stopping"),
              {"mlflow", "plotly"}
              | inner("ml.train", "ml.models", "ml.metrics", "render", "cli")),
    # The only code that imports mlflow; no training details.
    "tracking": (("__init__", "best", "common", "context", "ensemble_run", "guard",
                  "model_files", "priority", "probe", "reader", "repair", "server",
                  "system_metrics", "tracker", "trial_run"),
                 inner("ml.train", "ml.data", "ml.models", "ml.metrics", "fleet.jobs",
                       "results", "cli")),
    # The read side: MLflow only through `tracking.reader`, never the worker loop.
    "results": (("__init__", "read", "scoring", "rerun", "report"),
                {"mlflow"} | inner("search.study", "fleet", "cli")),
    # What people see: no storage internals, no torch.
    "render": (("__init__", "plots", "images", "formats", "display", "views"),
               {"mlflow", "torch", "torchvision", "sqlalchemy"}
               | inner("search.storage", "search.queries", "search.sqlite", "tracking", "ml",
                       "cli")),
}
# module -> more walls of its own
EXTRA: dict[str, set[str]] = {
    "errors": HEAVY | {"sweeper"},  # imports nothing of the package: everything imports it
    "keys": HEAVY | {"sweeper"},
    "uris": HEAVY | {"sweeper"},
    "redaction": HEAVY | {"sweeper"},
    "__init__": HEAVY,
    "cli": {"torch", "torchvision", "plotly", "matplotlib"},
    "serving": {"optuna", "plotly"} | inner("search", "tracking", "results", "fleet"),
    "ml.models": {"torchvision", "sweeper.ml.data"},
    "render.images": {"optuna", "plotly"},
    "render.views": {"optuna"},
    "results.read": {"sweeper.ml.train"},
    "results.report": {"torch", "sweeper.ml.train"},
    "results.scoring": {"optuna", "sweeper.ml.train"},
    "tracking.server": {"mlflow"},  # builds the command line only; the server is a process
    "tracking.common": {"mlflow"},
}


def table() -> dict[str, set[str]]:
    """module (dotted, without `sweeper.`) -> every name it must not import."""
    walls: dict[str, set[str]] = {}
    for folder, (modules, forbidden) in FOLDERS.items():
        for module in modules:
            name = f"{folder}.{module}" if folder else module
            walls[name] = forbidden | EXTRA.get(name, set())
    return walls


def on_disk() -> set[str]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts)
            for p in PACKAGE.rglob("*.py")}


def path_of(module: str) -> Path:
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _matches(name: str, banned: str) -> bool:
    if banned == "sweeper":  # the package itself, not the standard library
        return name == "sweeper" or name.startswith("sweeper.")
    return name == banned or name.startswith(banned + ".")


def test_the_table_lists_every_module_and_only_those() -> None:
    listed = set(table())
    unlisted = sorted(on_disk() - listed)
    gone = sorted(listed - on_disk())
    assert not unlisted, f"modules missing from the wall table in {__file__}: {unlisted}"
    assert not gone, f"the wall table lists modules that do not exist: {gone}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(FOLDER_NAMES), folders


@pytest.mark.parametrize("module", sorted(table()))
def test_module_keeps_its_walls(module: str) -> None:
    forbidden = table()[module]
    own = f"sweeper.{module}".removesuffix(".__init__")
    found = {name for name in imports_of(path_of(module)) for banned in forbidden
             if _matches(name, banned) and not _matches(name, own)}
    assert not found, f"sweeper/{module.replace('.', '/')}.py imports {sorted(found)}"


def test_only_tracking_imports_mlflow() -> None:
    offenders = [m for m in sorted(on_disk()) if not m.startswith("tracking.")
                 and any(_matches(n, "mlflow") for n in imports_of(path_of(m)))]
    assert not offenders, f"only sweeper/tracking/ may import mlflow: {offenders}"


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: a spec module that imports torch inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch.nn\n    from sweeper.ml import data\n")
    found = {n for n in imports_of(probe) for banned in table()["spec.config"]
             if _matches(n, banned)}
    assert found == {"torch.nn", "sweeper.ml", "sweeper.ml.data"}


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


@pytest.mark.parametrize("package", ["sweeper", *(f"sweeper.{f}" for f in FOLDER_NAMES)])
def test_package_inits_import_nothing_heavy(package: str) -> None:
    code = (f"import sys, {package}\n"
            "print('LOADED', sorted(m for m in ('torch', 'optuna', 'mlflow', 'sklearn', "
            "'plotly', 'sqlalchemy', 'pandas') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, check=False)
    assert "LOADED []" in result.stdout, result.stdout + result.stderr
