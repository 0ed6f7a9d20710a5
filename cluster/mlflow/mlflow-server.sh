#!/usr/bin/env bash
# MLflow tracking server for the sweeps: PostgreSQL backend store + S3 artifacts, proxied through
# the server (clients need no S3 credentials, only the tracking URI). See README.md here.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlartifacts \
#   PGPASSWORD=... cluster/mlflow/mlflow-server.sh
#
# Binds 127.0.0.1 unless MLFLOW_HOST says otherwise: nothing is exposed by accident. Expose it
# only behind authentication (MLFLOW_AUTH=basic, or the reverse proxy in nginx-mlflow.conf).
# `--print` shows the command instead of running it.
set -euo pipefail

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-4}"
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@db-host:5432/mlflow (password via PGPASSWORD or ~/.pgpass, not in the URI)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://my-bucket/mlartifacts}"

args=(server
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "$HOST" --port "$PORT" --workers "$WORKERS")

# Host-header allow-list (MLflow >= 3.5 security middleware): the default already allows
# localhost and private IPs; add the public name clients use, if any.
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

# MLFLOW_AUTH=basic: MLflow's basic-auth app (users, passwords, per-experiment permissions),
# configured by the ini file in MLFLOW_AUTH_CONFIG_PATH (see basic_auth.ini.example).
if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then
  : "${MLFLOW_AUTH_CONFIG_PATH:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_CONFIG_PATH (see basic_auth.ini.example)}"
  args+=(--app-name basic-auth)
fi

export MLFLOW_DISABLE_TELEMETRY=true
if [[ "${1:-}" == "--print" ]]; then
  # the backend URI is shown without any password it may (against advice) contain
  printf '%q ' mlflow "${args[@]}" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#'
  echo
  exit 0
fi
exec mlflow "${args[@]}"
