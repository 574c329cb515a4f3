#!/usr/bin/env bash
# Regenerate the Python protobuf, gRPC and type-stub modules beside every
# bkdbg/buildkit_proto/*.proto and bkdbg/daemon/*.proto.
#
# Environment:
#   PYTHON            interpreter with grpcio-tools (default: .venv/bin/python
#                     in the repository if present, else python3)
#   BKDBG_PROTO_OUT   output root (default: the repository root); modules land
#                     in <root>/bkdbg/..., so tests can regenerate into a temp dir
set -euo pipefail

# protoc output differs between grpcio-tools releases, so the committed
# modules are only reproducible with this exact version
readonly required_version="1.85.1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo_root/.venv/bin/python" ]]; then
        PYTHON="$repo_root/.venv/bin/python"
    else
        PYTHON="python3"
    fi
fi
out_root="${BKDBG_PROTO_OUT:-$repo_root}"

if ! command -v "$PYTHON" >/dev/null; then
    echo "gen_protos.sh: Python interpreter not found: $PYTHON: set PYTHON to one with grpcio-tools $required_version" >&2
    exit 1
fi

installed_version="$("$PYTHON" -c '
import importlib.metadata as metadata
try:
    print(metadata.version("grpcio-tools"))
except metadata.PackageNotFoundError:
    print("")
')"
if [[ "$installed_version" != "$required_version" ]]; then
    found="${installed_version:+grpcio-tools $installed_version}"
    echo "gen_protos.sh: grpcio-tools $required_version is required, but $PYTHON has ${found:-no grpcio-tools}: run $PYTHON -m pip install grpcio-tools==$required_version" >&2
    exit 1
fi

# a fixed locale keeps the glob order, and so the protoc call, the same everywhere
export LC_ALL=C
shopt -s nullglob
cd "$repo_root"
protos=(bkdbg/buildkit_proto/*.proto bkdbg/daemon/*.proto)
if [[ ${#protos[@]} -eq 0 ]]; then
    echo "gen_protos.sh: no .proto files found under $repo_root/bkdbg" >&2
    exit 1
fi

mkdir -p "$out_root"
"$PYTHON" -m grpc_tools.protoc \
    -I "$repo_root" \
    --python_out="$out_root" \
    --grpc_python_out="$out_root" \
    --pyi_out="$out_root" \
    "${protos[@]/#/$repo_root/}"
echo "gen_protos.sh: generated modules for ${#protos[@]} proto files under $out_root"
