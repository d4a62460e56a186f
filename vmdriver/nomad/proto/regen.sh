#!/bin/sh
# Regenerate the Python modules of the Nomad plugin protocol from the .proto
# files next to this script. Needs grpcio-tools (a dev dependency):
#     sh vmdriver/nomad/proto/regen.sh
# The generated *_pb2*.py(i) files are checked in; commit them after running.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
[ -x "$python" ] || python=python3
cd "$root"
rm -f vmdriver/nomad/proto/*_pb2.py vmdriver/nomad/proto/*_pb2_grpc.py vmdriver/nomad/proto/*_pb2.pyi
"$python" -m grpc_tools.protoc -I . \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    vmdriver/nomad/proto/*.proto
echo "regenerated: $(ls vmdriver/nomad/proto/*_pb2*.py | wc -l) modules"
