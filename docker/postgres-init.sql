-- Run once by the postgres image, on the first start of an empty data volume
-- (/docker-entrypoint-initdb.d/). Optuna and MLflow each keep their own schema and their
-- own `alembic_version` table, so they must never share a database: one each.
CREATE DATABASE optuna;
CREATE DATABASE mlflow;
