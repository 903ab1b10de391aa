#!/bin/sh
# Regenerate the gRPC modules of towerann.client from src/towerann/client/towerann_v1.proto (`make grpc`).
# The generated files are committed, so installing towerann needs no code generation; run this only after
# changing the .proto, with grpcio-tools of the version pyproject.toml pins for grpcio (the _grpc module
# refuses an older grpcio at import).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
  src/towerann/client/towerann_v1.proto
echo "generated src/towerann/client/towerann_v1_pb2.py, towerann_v1_pb2.pyi and towerann_v1_pb2_grpc.py"
