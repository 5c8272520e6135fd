"""A trial's model as an MLflow model whose files are data: `sweeper_model/` (config JSON
and safetensors weights, see `sweeper.ml.modelfile`), the `MLmodel` file naming
`sweeper.serving` as the pyfunc loader, a signature, an input example and the
environment files.

Reading one back (`load`) looks only at `MLmodel` (YAML, plain data) and the two files of
`sweeper_model/`: it never calls MLflow's loaders, which import what `MLmodel` names and
may unpickle. A model in any other format, the pickled one sweeper wrote before included,
is refused in one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.ml.modelfile import (
    CONFIG_FILE,
    FLAVOR,
    FORMAT,
    MODEL_DIR,
    VERSION,
    WEIGHTS_FILE,
    ModelFileError,
    ModelInfo,
    read_model,
    write_model,
)

if TYPE_CHECKING:
    import numpy as np
    from mlflow.models import Model
    from torch import nn

LOADER_MODULE = "sweeper.serving"
MAX_MLMODEL_BYTES = 1 << 20


def output_signature(num_classes: int) -> Any:
    """The pyfunc's signature: class probabilities [N, K] and the label [N]. The input
    is left open on purpose: MLflow would enforce one rank and one dtype, and the model
    takes raw images in several layouts and scales (`sweeper.serving`)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=None, outputs=Schema([
        TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities"),
        TensorSpec(np.dtype(np.int64), (-1,), "label")]))


def save(path: str | Path, model: nn.Module, info: ModelInfo, mlflow_model: Model, *,
         example: np.ndarray | None, requirements: list[str]) -> None:
    """Write the MLflow model folder `path` (created) for `model`."""
    import yaml
    from mlflow.models.utils import _save_example
    from mlflow.pyfunc import add_to_model
    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_model(path / MODEL_DIR, model, info)
    if example is not None:
        _save_example(mlflow_model, example, str(path))
    (path / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (path / "conda.yaml").write_text(yaml.safe_dump(
        _mlflow_conda_env(additional_pip_deps=requirements), sort_keys=False))
    _PythonEnv.current().to_yaml(str(path / "python_env.yaml"))
    add_to_model(mlflow_model, loader_module=LOADER_MODULE, data=MODEL_DIR,
                 conda_env="conda.yaml", python_env="python_env.yaml")
    mlflow_model.add_flavor(FLAVOR, format=FORMAT, version=VERSION, data=MODEL_DIR,
                            config=f"{MODEL_DIR}/{CONFIG_FILE}",
                            weights=f"{MODEL_DIR}/{WEIGHTS_FILE}")
    mlflow_model.save(str(path / "MLmodel"))


def check_flavor(mlmodel: str | Path) -> None:
    """Refuse (one line) an `MLmodel` that does not describe a sweeper model."""
    import yaml

    path = Path(mlmodel)
    text = _read_small(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    flavors = data.get("flavors") if isinstance(data, dict) else None
    if not isinstance(flavors, dict):
        raise ModelFileError(f"{path} is not an MLflow model description; the model files "
                             f"were altered: use another trial's model")
    if FLAVOR in flavors:
        return
    if "pytorch" in flavors:
        raise ModelFileError("this model was saved by an older sweeper as a pickle (MLflow's "
                             "pytorch flavour), which sweeper never loads because unpickling "
                             "runs code; run the trial again to log it as weights")
    raise ModelFileError(f"not a sweeper model (its flavours: "
                         f"{', '.join(sorted(map(str, flavors))[:5])}); sweeper loads only "
                         f"the models it logged")


def load(folder: str | Path, *, device: str = "cpu") -> nn.Module:
    """The module of a downloaded MLflow model folder (`MLmodel` and `sweeper_model/`)."""
    folder = Path(folder)
    check_flavor(folder / "MLmodel")
    model, _ = read_model(folder / MODEL_DIR, device=device)
    return model


def _read_small(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise ModelFileError(f"{path.name} is missing: not an MLflow model, or its upload "
                             f"did not finish; use another trial's model") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MLMODEL_BYTES:
            raise ModelFileError(f"{path.name} is not a small regular file; use another "
                                 f"trial's model")
        return f.read(MAX_MLMODEL_BYTES).decode("utf-8", errors="replace")
