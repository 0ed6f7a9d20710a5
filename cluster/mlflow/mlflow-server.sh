#!/usr/bin/env bash
# MLflow tracking server for the sweeps: PostgreSQL backend store + S3 artifacts, proxied through
# the server (clients need no S3 credentials, only the tracking URI). See README.md here.
#
#   pip install -c constraints.txt "mlflow[auth]" psycopg2-binary boto3   # once
#   MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlartifacts \
#   PGPASSWORD=... cluster/mlflow/mlflow-server.sh
#
# Binds 127.0.0.1 unless MLFLOW_HOST says otherwise: nothing is exposed by accident. Expose it
# only behind authentication (MLFLOW_AUTH=basic, or the reverse proxy in nginx-mlflow.conf).
# `--print` shows the command instead of running it (never a password or the secret key).
# tests/test_tracking_stack.py starts the server through this script (PostgreSQL, S3, basic auth).
set -euo pipefail
die() { echo "mlflow-server.sh: $*" >&2; exit 2; }

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-4}"
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql+psycopg2://mlflow@db-host:5432/mlflow (password via PGPASSWORD or ~/.pgpass, not in the URI)}"
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
# It needs the `mlflow[auth]` extra (Flask-WTF, its CSRF protection) and a static Flask secret
# key, the same for every worker and every restart (MLflow refuses to start without one): from
# the file named by MLFLOW_FLASK_SERVER_SECRET_KEY_FILE (preferred: `openssl rand -hex 32`, mode
# 600), else MLFLOW_FLASK_SERVER_SECRET_KEY itself. It reaches MLflow through the environment,
# never the command line.
key_problem=""
if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then
  : "${MLFLOW_AUTH_CONFIG_PATH:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_CONFIG_PATH (see basic_auth.ini.example)}"
  args+=(--app-name basic-auth)
  key_file="${MLFLOW_FLASK_SERVER_SECRET_KEY_FILE:-}"
  if [[ -n "$key_file" ]]; then
    [[ -r "$key_file" ]] || die "cannot read MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=$key_file"
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(<"$key_file")"
    [[ -n "$MLFLOW_FLASK_SERVER_SECRET_KEY" ]] || die "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=$key_file is empty"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  elif [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    key_problem="MLFLOW_AUTH=basic needs a static secret key: MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=<file> (e.g. umask 077; openssl rand -hex 32 > <file>) or MLFLOW_FLASK_SERVER_SECRET_KEY"
  fi
fi

export MLFLOW_DISABLE_TELEMETRY=true
if [[ "${1:-}" == "--print" ]]; then
  [[ -z "$key_problem" ]] || echo "warning: $key_problem" >&2
  # the backend URI is shown without any password it may (against advice) contain
  printf '%q ' mlflow "${args[@]}" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#'
  echo
  exit 0
fi
[[ -z "$key_problem" ]] || die "$key_problem"
if [[ "${MLFLOW_AUTH:-}" == "basic" && ! -r "$MLFLOW_AUTH_CONFIG_PATH" ]]; then
  die "cannot read MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH"
fi
exec mlflow "${args[@]}"
