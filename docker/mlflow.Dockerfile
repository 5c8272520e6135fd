# The team's MLflow tracking server (the `mlflow` service of docker-compose.yml).
# Only MLflow and the PostgreSQL driver: the command comes from the compose file, which a
# test checks against sweeper.server.server_command (the command sweeper runs and tests).
FROM python:3.11-slim

# Keep this pin equal to the MLflow that sweeper's tests run (pip show mlflow).
ARG MLFLOW_VERSION=3.17.2
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Flask-WTF: MLflow's basic-auth app (--app-name basic-auth) needs it.
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "Flask-WTF>=1.2"

# Not root. /mlartifacts and /mlflow-auth are created here so that a new named volume
# mounted on either starts out owned by this user.
RUN useradd --create-home --uid 1000 mlflow \
    && mkdir /mlartifacts /mlflow-auth && chown mlflow:mlflow /mlartifacts /mlflow-auth
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
