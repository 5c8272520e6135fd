-- Run by docker/postgres-init.sh on the first start of an empty data volume. Optuna and
-- MLflow each keep their own schema and their own `alembic_version` table, so they never
-- share a database; each gets its own role too, so the workers (role `optuna`) cannot
-- touch MLflow's records and the MLflow server (role `mlflow`) cannot touch the studies.
-- The superuser (POSTGRES_PASSWORD) is for administration only. Passwords come from the
-- environment (psql's \getenv), never from a command line.
\getenv optuna_password OPTUNA_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
CREATE ROLE optuna LOGIN PASSWORD :'optuna_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE optuna OWNER optuna;
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
