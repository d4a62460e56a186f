#!/bin/sh
# Regenerate the Python modules of the Nomad plugin protocol from the .proto
# files next to this script, with typed stubs (.pyi) for mypy --strict.
# Needs grpcio-tools and mypy-protobuf (dev dependencies):
#     sh vmdriver/nomad/proto/regen.sh
# The generated *_pb2*.py(i) files are checked in; commit them after running.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
[ -x "$python" ] || python=python3
cd "$root"
bindir=$(dirname "$python")
rm -f vmdriver/nomad/proto/*_pb2.py vmdriver/nomad/proto/*_pb2_grpc.py vmdriver/nomad/proto/*.pyi
"$python" -m grpc_tools.protoc -I . \
    --plugin=protoc-gen-mypy="$bindir/protoc-gen-mypy" \
    --plugin=protoc-gen-mypy_grpc="$bindir/protoc-gen-mypy_grpc" \
    --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. \
    vmdriver/nomad/proto/*.proto 2>"$root/.protoc.log" || { cat "$root/.protoc.log"; exit 1; }
rm -f "$root/.protoc.log"
# Generated code is checked by its generator, not by our mypy --strict settings.
for f in vmdriver/nomad/proto/*_pb2*.py vmdriver/nomad/proto/*_pb2*.pyi; do
    { echo "# mypy: ignore-errors"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
echo "regenerated: $(ls vmdriver/nomad/proto/*_pb2*.py | wc -l) modules"
