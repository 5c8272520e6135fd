#!/bin/sh
# Run once by the postgres image, on the first start of an empty data volume
# (/docker-entrypoint-initdb.d/): refuses placeholder passwords, then creates one role and
# one database for Optuna and for MLflow (docker/postgres-init.sql). The passwords come
# from the environment (.env), never from a command line.
set -eu
for name in POSTGRES_PASSWORD OPTUNA_DB_PASSWORD MLFLOW_DB_PASSWORD; do
    eval "value=\${$name:-}"
    if [ "${#value}" -lt 12 ] || [ "$value" = "change-me" ]; then
        echo "error: $name in .env must be a password of your own, 12 characters or more" >&2
        exit 1
    fi
done
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -f /sweeper/postgres-init.sql
