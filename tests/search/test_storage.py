"""Where studies are kept: URL precedence, engine settings, unreachable stores, and a real
study on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sweeper.errors import StorageError
from sweeper.keys import study_spec
from sweeper.search.storage import engine_kwargs, open_storage, redact
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config
from sweeper.uris import DEFAULT_STORAGE, resolve_storage_url, sqlalchemy_url


def test_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    assert resolve_storage_url() == DEFAULT_STORAGE == "sqlite:///mlruns/optuna.db"
    monkeypatch.setenv("SWEEPER_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url() == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///flag.db") == "sqlite:///flag.db"


def test_engine_settings_per_backend() -> None:
    assert engine_kwargs("sqlite:///x.db") == {"connect_args": {"timeout": 60}}
    server = engine_kwargs("postgresql://u@h/db")
    assert server["pool_pre_ping"] is True and server["pool_recycle"] == 1800
    # Two connections per worker (its loop, its heartbeat), four at most.
    assert server["pool_size"] + server["max_overflow"] == 4


def test_bare_postgresql_urls_use_the_shipped_driver() -> None:
    assert sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"


def test_redact_hides_passwords() -> None:
    assert redact("postgresql://sweeper:s3cret@db:5432/optuna") == \
        "postgresql://sweeper:***@db:5432/optuna"
    assert redact("sqlite:///mlruns/optuna.db") == "sqlite:///mlruns/optuna.db"


def test_sqlite_folder_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'optuna.db'}"
    open_storage(url)
    assert (tmp_path / "nested" / "dir" / "optuna.db").exists()


def test_unreachable_server_is_one_line() -> None:
    with pytest.raises(StorageError) as info:
        open_storage("postgresql://nobody:pw@127.0.0.1:1/none?connect_timeout=3")
    message = str(info.value)
    assert "\n" not in message and "nobody:***@127.0.0.1:1" in message
    assert "pw@" not in message


def test_study_on_postgresql(postgres_url: str) -> None:
    spec = config.loads("""
name: pg
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [16]}
budget: {trials: 2, epochs: 1}
sampler: {name: random, seed: 0}
space:
  train.lr: {float: [1.0e-3, 1.0e-2], log: true}
""")
    report = run_study(spec, RunOptions(storage=postgres_url, device="cpu"))
    assert [o.state for o in report.outcomes] == ["COMPLETE", "COMPLETE"]
    study = optuna.load_study(study_name="pg", storage=sqlalchemy_url(postgres_url))
    assert len(study.trials) == 2 and study_spec(study)["name"] == "pg"
    resumed = run_study(spec, RunOptions(storage=postgres_url, device="cpu", more_trials=1))
    assert len(resumed.outcomes) == 1
    assert len(optuna.load_study(study_name="pg", storage=sqlalchemy_url(postgres_url)).trials) == 3
