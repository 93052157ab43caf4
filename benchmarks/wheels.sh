#!/usr/bin/env bash
# Wheels for what the lent GPU machines' image lacks (python 3.12; it has torch, timm, torchvision,
# peft, pandas, matplotlib, psutil, but not mlflow or optuna). Run where PyPI is reachable, from the
# repository root; benchmarks/gpu.sh installs them from .whl/ (kept out of git by .gitignore).
# mlflow-skinny is the tracking client with the SQLite store (the full mlflow adds only the server
# and UI); faiss is left out: on a GPU the metrics run on torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
WHEELS=(
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 alembic==1.20.1 sqlalchemy==2.1.9 mako==1.4.3
  cachetools==7.3.3 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 databricks-sdk==0.162.0
  google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 fastapi==0.165.0 starlette==1.10.0
  uvicorn==0.54.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4 sqlparse==0.6.1 skops==0.16.0
  prettytable==3.18.0 wcwidth==0.9.4 optuna==5.0.0 colorlog==6.12.0 adjustText==1.4.0
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
