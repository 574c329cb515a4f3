"""Tests for parsing BuildKit's error details into failed steps, from recorded trailers.

Each `tests/data/errdetails/NAME.bin` is the `grpc-status-details-bin` trailer of
`LLBBridge.Solve` for `Dockerfile.NAME` beside it. They were recorded from Docker Engine
26.1.5 (BuildKit v0.13) with bkdbg's GatewayBuild, and `target.bin` with `--target nope`.
"""

from pathlib import Path

import grpc
import pytest

from bkdbg.buildkit_proto import rpc_status_pb2
from bkdbg.gateway.errdetails import (
    details_from_status,
    dockerfile_stages,
    error_details,
    failed_exec,
    failed_step,
    failure_message,
    parse_status,
    source_excerpt,
)

DATA = Path(__file__).parent / "data" / "errdetails"
EXEC_MESSAGE = (
    'process "/bin/sh -c echo partial > /partial && echo \\"failing now\\" && exit 7" '
    "did not complete successfully: exit code: 7"
)


class FakeRpcError(grpc.RpcError, grpc.Call):
    """An RpcError as grpcio raises it for a failed unary call, with a trailer."""

    def __init__(self, trailer: bytes | None, message: str = "failed") -> None:
        self._trailer = trailer
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return self._message

    def trailing_metadata(self):
        if self._trailer is None:
            return ()
        return (("content-type", "application/grpc"), ("grpc-status-details-bin", self._trailer))

    def initial_metadata(self):
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self):
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False


def _details(name: str):
    return error_details(FakeRpcError((DATA / f"{name}.bin").read_bytes()))


def test_exec_failure_details() -> None:
    details = _details("exec")

    assert details.message == EXEC_MESSAGE
    assert details.exit_code == 7
    assert details.vertex is not None and details.vertex.startswith("sha256:")
    assert details.solve is not None
    assert details.solve.op.HasField("exec")


def test_exec_failure_step() -> None:
    step = failed_step(_details("exec"), vertex_name="[3/4] RUN echo", logs=["failing now"])

    assert step.is_exec
    assert step.exit_code == 7
    assert step.filename == "Dockerfile.exec"
    assert step.line == 4
    assert step.instruction == 'RUN echo partial > /partial && echo "failing now" && exit 7'
    assert step.command[:2] == ["/bin/sh", "-c"]
    assert "FOO=bar" in step.env
    assert step.cwd == "/work"
    assert step.user == ""
    assert step.logs == ["failing now"]
    assert step.vertex_name == "[3/4] RUN echo"


def test_exec_failure_source_excerpt() -> None:
    step = failed_step(_details("exec"))

    assert step.source_lines == [
        "   2 |     WORKDIR /work",
        "   3 |     ENV FOO=bar",
        '   4 | >>> RUN echo partial > /partial && echo "failing now" && exit 7',
        "   5 |     RUN echo never",
        "   6 |     ",
    ]


def test_exec_failure_ids() -> None:
    details = _details("exec")
    failure = failed_exec(details, failed_step(details))

    assert failure is not None
    assert len(failure.exec_op.mounts) == 1
    assert failure.exec_op.mounts[0].dest == "/"
    assert len(failure.mount_ids) == 1
    assert len(failure.input_ids) == 1
    assert failure.mount_ids[0] and "::" in failure.mount_ids[0]
    assert failure.input_ids[0] and failure.input_ids[0] != failure.mount_ids[0]
    assert failure.platform is not None
    assert failure.platform.OS == "linux"


def test_copy_failure_not_exec() -> None:
    details = _details("copy")
    step = failed_step(details)

    assert not step.is_exec
    assert step.instruction == "COPY missing.txt /x"
    assert step.line == 2
    assert failed_exec(details, step) is None
    assert failure_message(details, step) == (
        'build step failed: Dockerfile.copy:2 COPY missing.txt /x: "/missing.txt" not found: '
        "check the path and .dockerignore"
    )


def test_missing_bind_source_not_exec() -> None:
    details = _details("bind")
    step = failed_step(details)

    assert details.solve is not None and details.solve.op.HasField("exec")
    assert not step.is_exec
    assert failed_exec(details, step) is None
    assert step.instruction == "RUN --mount=type=bind,source=nope,target=/n true"
    assert '"/nope" not found' in failure_message(details, step)


def test_parse_error_message() -> None:
    details = _details("parse")
    step = failed_step(details)

    assert failure_message(details, step) == (
        "invalid Dockerfile: Dockerfile.parse:2: unknown instruction: RUNN (did you mean RUN?): "
        "fix that line"
    )


def test_unknown_target_lists_stages() -> None:
    details = _details("target")
    text = (DATA / "Dockerfile.target").read_text()

    message = failure_message(details, failed_step(details), text, "nope")

    assert message == "unknown build target: nope: use one of base, second"


def test_exec_failure_message() -> None:
    details = _details("exec")

    message = failure_message(details, failed_step(details))

    assert message == (
        "build step failed: Dockerfile.exec:4 RUN echo partial > /partial && "
        f'echo "failing now" && exit 7: {EXEC_MESSAGE}'
    )


def test_error_without_trailer() -> None:
    details = error_details(FakeRpcError(None, "rpc error: code = Unknown desc = boom"))

    assert details.solve is None
    assert failure_message(details, failed_step(details)) == "build failed: boom"


def test_undecodable_trailer_ignored() -> None:
    assert parse_status(b"\xff\xff\xff") is None


def test_unparsable_detail_skipped() -> None:
    status = rpc_status_pb2.Status(code=2, message="x")
    status.details.add(type_url="github.com/moby/buildkit/errdefs.Solve+json", value=b"{nope")
    status.details.add(
        type_url="github.com/moby/buildkit/gatewayapi.ExitMessage+json", value=b'{"Code":3}'
    )

    details = details_from_status(status)

    assert details.solve is None
    assert details.exit_code == 3


@pytest.mark.parametrize(
    ("text", "stages"),
    [
        ("FROM a AS one\nRUN x\nfrom --platform=$BUILDPLATFORM b as Two\n", ["one", "Two"]),
        ("FROM a\n", []),
    ],
)
def test_dockerfile_stages(text: str, stages: list[str]) -> None:
    assert dockerfile_stages(text) == stages


def test_source_excerpt_without_ranges() -> None:
    details = _details("exec")
    source = details.sources[0]
    del source.ranges[:]

    assert source_excerpt(source) == (0, 0, [])
