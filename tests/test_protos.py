"""Tests for the committed protobuf modules: freshness and BuildKit wire facts."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from bkdbg.buildkit_proto import (
    control_pb2,
    errdefs_pb2,
    fsutil_types_pb2,
    gateway_pb2,
    ops_pb2,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.sh"
PROTO_DIRS = ("bkdbg/buildkit_proto", "bkdbg/daemon")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def _generated_files(root: Path) -> set[str]:
    """Return the repo-relative paths of generated modules under root."""
    found: set[str] = set()
    for proto_dir in PROTO_DIRS:
        for suffix in GENERATED_SUFFIXES:
            found.update(
                path.relative_to(root).as_posix() for path in (root / proto_dir).glob(f"*{suffix}")
            )
    return found


def _module_names() -> list[str]:
    """Return the dotted names of every committed generated Python module."""
    paths = sorted(name for name in _generated_files(REPO_ROOT) if name.endswith(".py"))
    return [path.removesuffix(".py").replace("/", ".") for path in paths]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run scripts/gen_protos.sh into a temp dir and return that dir."""
    out_root = tmp_path_factory.mktemp("protos")
    env = {**os.environ, "BKDBG_PROTO_OUT": str(out_root), "PYTHON": sys.executable}
    result = subprocess.run(
        [str(GEN_SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"gen_protos.sh failed: {result.stderr.strip()}"
    return out_root


def test_generated_modules_present(regenerated: Path) -> None:
    missing = _generated_files(regenerated) - _generated_files(REPO_ROOT)
    assert not missing, f"not committed, run scripts/gen_protos.sh: {sorted(missing)}"


def test_no_orphan_generated_modules(regenerated: Path) -> None:
    orphans = _generated_files(REPO_ROOT) - _generated_files(regenerated)
    assert not orphans, f"generated modules without a .proto, delete them: {sorted(orphans)}"


def test_generated_modules_fresh(regenerated: Path) -> None:
    stale = [
        name
        for name in sorted(_generated_files(regenerated) & _generated_files(REPO_ROOT))
        if (regenerated / name).read_bytes() != (REPO_ROOT / name).read_bytes()
    ]
    assert not stale, f"stale, run scripts/gen_protos.sh: {stale}"


@pytest.mark.parametrize("module_name", _module_names())
def test_generated_module_imports(module_name: str) -> None:
    assert importlib.import_module(module_name) is not None


def test_generated_modules_import_elsewhere(tmp_path: Path) -> None:
    # the modules must import by package path alone, with no sys.path additions
    code = "; ".join(f"import {name}" for name in _module_names())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("module", "package"),
    [
        (ops_pb2, "pb"),
        (control_pb2, "moby.buildkit.v1"),
        (gateway_pb2, "moby.buildkit.v1.frontend"),
        (errdefs_pb2, "errdefs"),
        (fsutil_types_pb2, "fsutil.types"),
    ],
)
def test_proto_packages(module: object, package: str) -> None:
    assert module.DESCRIPTOR.package == package  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("module_name", "service", "method", "full_name"),
    [
        ("control_pb2", "Control", "Session", "/moby.buildkit.v1.Control/Session"),
        ("control_pb2", "Control", "Solve", "/moby.buildkit.v1.Control/Solve"),
        ("control_pb2", "Control", "Status", "/moby.buildkit.v1.Control/Status"),
        (
            "gateway_pb2",
            "LLBBridge",
            "ExecProcess",
            "/moby.buildkit.v1.frontend.LLBBridge/ExecProcess",
        ),
        ("gateway_pb2", "LLBBridge", "Return", "/moby.buildkit.v1.frontend.LLBBridge/Return"),
        (
            "gateway_pb2",
            "LLBBridge",
            "StatFileContainer",
            "/moby.buildkit.v1.frontend.LLBBridge/StatFileContainer",
        ),
        ("filesync_pb2", "FileSync", "DiffCopy", "/moby.filesync.v1.FileSync/DiffCopy"),
        ("filesync_pb2", "FileSync", "TarStream", "/moby.filesync.v1.FileSync/TarStream"),
        ("filesync_pb2", "FileSend", "DiffCopy", "/moby.filesync.v1.FileSend/DiffCopy"),
        ("auth_pb2", "Auth", "FetchToken", "/moby.filesync.v1.Auth/FetchToken"),
        ("secrets_pb2", "Secrets", "GetSecret", "/moby.buildkit.secrets.v1.Secrets/GetSecret"),
        ("sshforward_pb2", "SSH", "ForwardAgent", "/moby.sshforward.v1.SSH/ForwardAgent"),
    ],
)
def test_method_full_names(module_name: str, service: str, method: str, full_name: str) -> None:
    module = importlib.import_module(f"bkdbg.buildkit_proto.{module_name}")
    descriptor = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    assert f"/{descriptor.containing_service.full_name}/{descriptor.name}" == full_name

    # the stubs carry their own copy of the path string, which is what goes on the wire
    grpc_module = importlib.import_module(f"bkdbg.buildkit_proto.{module_name}_grpc")
    assert f"'{full_name}'" in Path(grpc_module.__file__ or "").read_text()


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (
            gateway_pb2.ExecMessage,
            {
                "ProcessID": 1,
                "Init": 2,
                "File": 3,
                "Resize": 4,
                "Started": 5,
                "Exit": 6,
                "Done": 7,
                "Signal": 8,
            },
        ),
        (gateway_pb2.InitMessage, {"ContainerID": 1, "Meta": 2, "Fds": 3, "Tty": 4}),
        (gateway_pb2.FdMessage, {"Fd": 1, "EOF": 2, "Data": 3}),
        (
            gateway_pb2.SolveRequest,
            {"Frontend": 2, "allowResultReturn": 5, "allowResultArrayRef": 6, "Evaluate": 14},
        ),
        (gateway_pb2.ReturnRequest, {"result": 1, "error": 2}),
        (ops_pb2.Mount, {"dest": 3, "output": 4, "mountType": 6, "SSHOpt": 22, "resultID": 23}),
        (ops_pb2.Meta, {"args": 1, "env": 2, "cwd": 3, "user": 4}),
        (control_pb2.SolveRequest, {"Ref": 1, "Session": 5, "Frontend": 6, "Exporters": 13}),
        (fsutil_types_pb2.Packet, {"type": 1, "stat": 2, "ID": 3, "data": 4}),
        (fsutil_types_pb2.Stat, {"mode": 2, "modTime": 6, "xattrs": 10}),
        (errdefs_pb2.Solve, {"inputIDs": 1, "mountIDs": 2, "op": 3, "description": 6}),
    ],
)
def test_field_names_and_numbers(message: type, fields: dict[str, int]) -> None:
    by_name = message.DESCRIPTOR.fields_by_name  # type: ignore[attr-defined]
    for name, number in fields.items():
        assert name in by_name, f"{message.__name__} has no field {name}"
        assert by_name[name].number == number, f"{message.__name__}.{name}"


def test_exec_message_oneof() -> None:
    oneof = gateway_pb2.ExecMessage.DESCRIPTOR.oneofs_by_name["Input"]
    names = [field.name for field in oneof.fields]
    assert names == ["Init", "File", "Resize", "Started", "Exit", "Done", "Signal"]


def test_packet_types() -> None:
    packet_type = fsutil_types_pb2.Packet.PacketType
    assert packet_type.Value("PACKET_STAT") == 0
    assert packet_type.Value("PACKET_ERR") == 4


def test_errdefs_solve_parses_daemon_json() -> None:
    # shape of the errdefs.Solve+json detail that BuildKit attaches to a failed RUN step
    detail = {
        "inputIDs": ["w::in0"],
        "mountIDs": ["w::m0"],
        "op": {
            "inputs": [{"digest": "sha256:ab", "index": 0}],
            "exec": {"meta": {"args": ["/bin/sh", "-c", "exit 7"], "cwd": "/work"}},
            "platform": {"Architecture": "amd64", "OS": "linux"},
        },
        "description": {"llb.customname": "[2/2] RUN exit 7"},
    }
    solve = json_format.ParseDict(detail, errdefs_pb2.Solve(), ignore_unknown_fields=True)
    assert solve.mountIDs == ["w::m0"]
    assert solve.op.WhichOneof("op") == "exec"
    assert solve.op.exec.meta.cwd == "/work"
    assert solve.description["llb.customname"] == "[2/2] RUN exit 7"
