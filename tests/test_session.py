"""Tests of the session: its HTTP/2 server, its services, and sessions on the real BuildKit."""

import base64
import io
import json
import logging
import os
import queue
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest

from bkdbg.buildkit_proto import (
    auth_pb2,
    control_pb2,
    control_pb2_grpc,
    secrets_pb2,
    sshforward_pb2,
)
from bkdbg.errors import BuildkitError, UsageError
from bkdbg.gateway.auth import AuthService
from bkdbg.gateway.connection import Connection, ControlClient, connect
from bkdbg.gateway.h2call import RequestStream, ResponseBatch
from bkdbg.gateway.h2server import H2Server
from bkdbg.gateway.secrets import SecretsService
from bkdbg.gateway.session import Session, health_handler
from bkdbg.gateway.sshforward import SSHService
from bkdbg.options import SecretSpec, SSHSpec
from tests.helpers.context import TEST_IMAGE


class H2TestServer:
    """Serves handlers with H2Server on a unix socket, so that grpcio clients can call them."""

    def __init__(self, handlers: Sequence[grpc.GenericRpcHandler], directory: Path) -> None:
        self.path = str(directory / "h2.sock")
        self._handlers = list(handlers)
        self._executor = futures.ThreadPoolExecutor(16)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen()
        self._servers: list[H2Server] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            server = H2Server(self._handlers, self._executor, name="test")
            server.start()
            self._servers.append(server)
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn, server), daemon=True).start()
            threading.Thread(target=self._write, args=(conn, server), daemon=True).start()

    def _read(self, conn: socket.socket, server: H2Server) -> None:
        try:
            while data := conn.recv(65536):
                server.feed(data)
        except OSError:
            pass
        finally:
            server.close()

    def _write(self, conn: socket.socket, server: H2Server) -> None:
        try:
            while (data := server.outbox.take(1 << 20)) is not None:
                conn.sendall(data)
        except OSError:
            pass

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.path}")

    def close(self) -> None:
        self._listener.close()
        for server in self._servers:
            server.close()
        for conn in self._conns:
            conn.close()
        self._executor.shutdown(wait=False)


@pytest.fixture
def h2_server(tmp_path: Path) -> Iterator[Any]:
    """Return start(handlers) -> H2TestServer; every server is closed after the test."""
    servers: list[H2TestServer] = []

    def start(handlers: Sequence[grpc.GenericRpcHandler]) -> H2TestServer:
        server = H2TestServer(handlers, tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def unary(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> Any:
    call = channel.unary_unary(
        method,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    return call(request, timeout=10)


# --- the HTTP/2 server --------------------------------------------------------------


def echo_handler() -> grpc.GenericRpcHandler:
    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here: 100% sure ✓")

    methods = {
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    return grpc.method_handlers_generic_handler("test.Test", methods)


def test_h2_health_check(h2_server: Any) -> None:
    server = h2_server([health_handler()])
    with server.channel() as channel:
        response = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert response == b"\x08\x01"


def test_h2_echo_large_and_many(h2_server: Any) -> None:
    server = h2_server([echo_handler()])
    messages = [os.urandom(3 * 1024 * 1024), b"", *(b"m%d" % i for i in range(2000))]
    with server.channel() as channel:
        replies = list(channel.stream_stream("/test.Test/Echo")(iter(messages), timeout=30))
    assert len(replies) == len(messages)
    assert replies == messages


def test_h2_response_batches_arrive_as_messages(h2_server: Any) -> None:
    # messages larger than a frame and than an outbox chunk, and many small ones
    batches = [
        ResponseBatch([os.urandom(300 * 1024), b"", os.urandom(20_000)]),
        ResponseBatch(b"s%d" % i for i in range(3000)),
        b"single",
    ]

    def send(request: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from batches

    handler = grpc.method_handlers_generic_handler(
        "test.Test", {"Batches": grpc.unary_stream_rpc_method_handler(send)}
    )
    server = h2_server([handler])
    with server.channel() as channel:
        replies = list(channel.unary_stream("/test.Test/Batches")(b"", timeout=30))
    assert replies == [*batches[0], *batches[1], b"single"]


def test_h2_request_stream_ready(h2_server: Any) -> None:
    readiness: list[bool] = []

    def probe(requests: RequestStream, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"waiting"
        readiness.append(requests.ready())  # the client sends only after "waiting"
        first = next(requests)
        rest = list(requests)
        readiness.append(requests.ready())
        yield first + b"".join(rest)

    handler = grpc.method_handlers_generic_handler(
        "test.Test", {"Probe": grpc.stream_stream_rpc_method_handler(probe)}
    )
    server = h2_server([handler])
    outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    with server.channel() as channel:
        call = channel.stream_stream("/test.Test/Probe")(
            iter(outgoing.get, None), timeout=30
        )
        assert next(call) == b"waiting"
        outgoing.put(b"a")
        outgoing.put(None)
        assert list(call) == [b"a"]
    assert readiness == [False, True]


def test_h2_abort_status(h2_server: Any) -> None:
    server = h2_server([echo_handler()])
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/test.Test/Fail")(b"x", timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "nothing here: 100% sure ✓"


def test_h2_unknown_method(h2_server: Any) -> None:
    server = h2_server([echo_handler()])
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/test.Test/Nope")(b"x", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_h2_client_cancel_runs_callback(h2_server: Any) -> None:
    done = threading.Event()

    def wait(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(done.set)
        yield b"started"
        for _ in requests:
            pass

    handler = grpc.method_handlers_generic_handler(
        "test.Wait", {"Wait": grpc.stream_stream_rpc_method_handler(wait)}
    )
    server = h2_server([handler])
    with server.channel() as channel:
        call = channel.stream_stream("/test.Wait/Wait")(iter(threading.Event().wait, True))
        assert next(call) == b"started"
        call.cancel()
        assert done.wait(5)


# --- secrets ------------------------------------------------------------------------


def test_secret_from_file_and_env(h2_server: Any, tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_bytes(b"file-secret\n")
    specs = [SecretSpec("file", src=str(secret_file)), SecretSpec("env", env="TOKEN", value="v1")]
    server = h2_server([SecretsService(specs).handler()])
    method = "/moby.buildkit.secrets.v1.Secrets/GetSecret"
    with server.channel() as channel:
        for secret_id, expected in (("file", b"file-secret\n"), ("env", b"v1")):
            request = secrets_pb2.GetSecretRequest(ID=secret_id)
            assert unary(channel, method, request, secrets_pb2.GetSecretResponse).data == expected


def test_secret_unknown_id(h2_server: Any) -> None:
    server = h2_server([SecretsService([SecretSpec("known", value="hidden-value")]).handler()])
    request = secrets_pb2.GetSecretRequest(ID="other")
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        unary(
            channel,
            "/moby.buildkit.secrets.v1.Secrets/GetSecret",
            request,
            secrets_pb2.GetSecretResponse,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "other" in caught.value.details()
    assert "hidden-value" not in caught.value.details()


def test_secret_too_large(h2_server: Any) -> None:
    server = h2_server([SecretsService([SecretSpec("big", value="x" * 600_000)]).handler()])
    request = secrets_pb2.GetSecretRequest(ID="big")
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        unary(
            channel,
            "/moby.buildkit.secrets.v1.Secrets/GetSecret",
            request,
            secrets_pb2.GetSecretResponse,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- auth -----------------------------------------------------------------------------


def write_docker_config(home: Path, config: dict[str, Any]) -> Path:
    path = home / ".docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def credentials(channel: grpc.Channel, host: str) -> tuple[str, str]:
    request = auth_pb2.CredentialsRequest(Host=host)
    response = unary(
        channel, "/moby.filesync.v1.Auth/Credentials", request, auth_pb2.CredentialsResponse
    )
    return response.Username, response.Secret


def test_auth_from_config_file(h2_server: Any, isolated_env: Any) -> None:
    encoded = base64.b64encode(b"alice:pa:ss").decode()
    write_docker_config(
        isolated_env.home,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": encoded},
                "https://registry.example.com/v2/": {"auth": encoded},
                "tokens.example.com": {"identitytoken": "id-token"},
            }
        },
    )
    server = h2_server([AuthService().handler()])
    with server.channel() as channel:
        assert credentials(channel, "registry-1.docker.io") == ("alice", "pa:ss")
        assert credentials(channel, "registry.example.com") == ("alice", "pa:ss")
        assert credentials(channel, "tokens.example.com") == ("", "id-token")
        assert credentials(channel, "other.example.com") == ("", "")


def test_auth_anonymous_without_config(h2_server: Any) -> None:
    server = h2_server([AuthService().handler()])
    with server.channel() as channel:
        assert credentials(channel, "registry-1.docker.io") == ("", "")


def test_auth_token_methods_unimplemented(h2_server: Any) -> None:
    server = h2_server([AuthService().handler()])
    request = auth_pb2.GetTokenAuthorityRequest(Host="registry-1.docker.io")
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        unary(
            channel,
            "/moby.filesync.v1.Auth/GetTokenAuthority",
            request,
            auth_pb2.GetTokenAuthorityResponse,
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_auth_credential_helpers(
    h2_server: Any, isolated_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\n"
        "read url\n"
        'case "$url" in\n'
        '  helped.example.com) echo \'{"ServerURL":"x","Username":"bob","Secret":"s3"}\' ;;\n'
        '  token.example.com) echo \'{"ServerURL":"x","Username":"<token>","Secret":"t"}\' ;;\n'
        "  *) echo 'credentials not found in native keychain'; exit 1 ;;\n"
        "esac\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    write_docker_config(
        isolated_env.home,
        {
            "credsStore": "fake",
            "credHelpers": {"broken.example.com": "missing"},
            "auths": {"helped.example.com": {"auth": base64.b64encode(b"no:no").decode()}},
        },
    )
    server = h2_server([AuthService().handler()])
    with server.channel() as channel:
        assert credentials(channel, "helped.example.com") == ("bob", "s3")
        assert credentials(channel, "token.example.com") == ("", "t")
        assert credentials(channel, "unknown.example.com") == ("", "")
        with pytest.raises(grpc.RpcError) as caught:
            credentials(channel, "broken.example.com")
    assert "docker-credential-missing" in caught.value.details()


# --- ssh forwarding -------------------------------------------------------------------


def agent_frame(kind: int, body: bytes = b"") -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


@dataclass
class FakeAgent:
    """An SSH agent socket that replies to every request with an empty identity list."""

    path: str
    received: list[int]

    @classmethod
    def start(cls, path: str) -> "FakeAgent":
        agent = cls(path, [])
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        threading.Thread(target=agent._serve, args=(listener,), daemon=True).start()
        return agent

    def _serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                while header := conn.recv(5):
                    length, kind = struct.unpack(">IB", header)
                    conn.recv(length - 1) if length > 1 else b""
                    self.received.append(kind)
                    conn.sendall(agent_frame(12, struct.pack(">I", 0)))


def forward(channel: grpc.Channel, ssh_id: str, frames: list[bytes]) -> list[bytes]:
    call = channel.stream_stream(
        "/moby.sshforward.v1.SSH/ForwardAgent",
        request_serializer=sshforward_pb2.BytesMessage.SerializeToString,
        response_deserializer=sshforward_pb2.BytesMessage.FromString,
    )
    requests = (sshforward_pb2.BytesMessage(data=frame) for frame in frames)
    metadata = [("buildkit.ssh.id", ssh_id)] if ssh_id else []
    return [reply.data for reply in call(requests, metadata=metadata, timeout=10)]


def test_ssh_forward_is_read_only(h2_server: Any, tmp_path: Path) -> None:
    agent = FakeAgent.start(str(tmp_path / "agent.sock"))
    service = SSHService([SSHSpec("default", [agent.path])])
    service.start()
    try:
        server = h2_server([service.handler()])
        with server.channel() as channel:
            # a request split over two messages, then an ADD_IDENTITY that must not pass
            list_request = agent_frame(11)
            replies = forward(
                channel, "", [list_request[:2], list_request[2:], agent_frame(17, b"k")]
            )
            check = unary(
                channel,
                "/moby.sshforward.v1.SSH/CheckAgent",
                sshforward_pb2.CheckAgentRequest(ID=""),
                sshforward_pb2.CheckAgentResponse,
            )
    finally:
        service.close()
    assert replies == [agent_frame(12, struct.pack(">I", 0)), agent_frame(5)]
    assert agent.received == [11]
    assert check == sshforward_pb2.CheckAgentResponse()


def test_ssh_unknown_id(h2_server: Any) -> None:
    service = SSHService([])
    service.start()
    server = h2_server([service.handler()])
    request = sshforward_pb2.CheckAgentRequest(ID="deploy")
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        unary(
            channel,
            "/moby.sshforward.v1.SSH/CheckAgent",
            request,
            sshforward_pb2.CheckAgentResponse,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "deploy" in caught.value.details()


@pytest.mark.skipif(
    shutil.which("ssh-agent") is None or shutil.which("ssh-keygen") is None,
    reason="needs OpenSSH's ssh-agent, ssh-add and ssh-keygen",
)
def test_ssh_key_file_agent(h2_server: Any, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    service = SSHService([SSHSpec("keys", [str(key)])])
    service.start()
    try:
        server = h2_server([service.handler()])
        with server.channel() as channel:
            replies = forward(channel, "keys", [agent_frame(11)])
    finally:
        service.close()
    assert replies[0][4] == 12  # SSH_AGENT_IDENTITIES_ANSWER
    assert struct.unpack(">I", replies[0][5:9])[0] == 1


def test_ssh_invalid_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid --ssh value: default"):
        SSHService([SSHSpec("default", [str(tmp_path / "missing.sock")])]).start()


# --- sessions on the real BuildKit ---------------------------------------------------


@dataclass
class Target:
    """An export destination, as bkdbg.gateway.export.ExportTarget has it."""

    index: int
    directory: str | None = None
    stream: BinaryIO | None = None


def solve(
    addr: str,
    context: Path,
    exporter: str,
    target: Target,
    secrets: Sequence[SecretSpec] = (),
    control: Callable[[Connection], Any] = lambda conn: conn.control,
) -> None:
    """Build `context` with the Dockerfile frontend directly and one exporter.

    `control` returns what the session gets as its `control` argument.
    """
    with connect(addr) as conn:
        session = Session(
            control(conn),
            shared_key=f"test-{time.monotonic_ns()}",
            local_dirs={"context": str(context), "dockerfile": str(context)},
            secrets=secrets,
            exports=[target],
        )
        try:
            session.start()
            request = control_pb2.SolveRequest(
                Ref=f"test-{session.id}",
                Session=session.id,
                Frontend="dockerfile.v0",
                FrontendAttrs={"filename": "Dockerfile"},
                Exporters=[control_pb2.Exporter(Type=exporter)],
                ExporterDeprecated=exporter,
            )
            conn.control.Solve(request, timeout=120)
        finally:
            session.close()


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """Map each path below root to (kind, permission bits, content or link target)."""
    found: dict[str, tuple[str, int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            found[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir", st.st_mode & 0o7777, "")
        else:
            found[rel] = ("file", st.st_mode & 0o7777, path.read_bytes().decode())
    return found


CONTEXT_FILES = {
    ".dockerignore": "**/*.log\n!keep/**/*.log\nsecret*\n# comment\n/tmp\n",
    "app/main.sh": "echo main\n",
    "app/debug.log": "dropped\n",
    "keep/deep/kept.log": "kept\n",
    "secret.txt": "dropped\n",
    "tmp/scratch": "dropped\n",
    "ünïcödé.txt": "unicode\n",
}


def write_test_context(make_context: Any) -> Path:
    # a file unique to this run keeps BuildKit from taking the COPY result from its cache,
    # which would keep the mtimes of an earlier run
    files = {**CONTEXT_FILES, "nonce": str(time.time_ns())}
    context: Path = make_context("FROM scratch\nCOPY . /ctx/\n", files)
    (context / "app" / "main.sh").chmod(0o755)
    (context / "empty" / "nested").mkdir(parents=True)
    (context / "link-to-main").symlink_to("app/main.sh")
    (context / "dangling").symlink_to("/no/such/file")
    return context


def test_session_local_export_matches_context(
    buildkit_addr: str, make_context: Any, tmp_path: Path
) -> None:
    context = write_test_context(make_context)
    out = tmp_path / "out"
    solve(buildkit_addr, context, "local", Target(0, directory=str(out)))

    exported = tree(out / "ctx")
    assert set(exported) == {
        ".dockerignore",
        "Dockerfile",
        "app",
        "app/main.sh",
        "dangling",
        "empty",
        "empty/nested",
        "keep",
        "keep/deep",
        "keep/deep/kept.log",
        "link-to-main",
        "nonce",
        "ünïcödé.txt",
    }
    assert exported["app/main.sh"] == ("file", 0o755, "echo main\n")
    assert exported["keep/deep/kept.log"] == ("file", 0o644, "kept\n")
    assert exported["link-to-main"] == ("link", 0, "app/main.sh")
    assert exported["dangling"] == ("link", 0, "/no/such/file")
    assert exported["empty/nested"][0] == "dir"
    assert exported["ünïcödé.txt"][2] == "unicode\n"
    source_mtime = (context / "app" / "main.sh").stat().st_mtime_ns
    assert (out / "ctx" / "app" / "main.sh").stat().st_mtime_ns == source_mtime


def without_session_endpoint(conn: Connection) -> ControlClient:
    return ControlClient(conn.channel, conn.h2_dialer, None)


def with_failing_session_endpoint(conn: Connection) -> ControlClient:
    def reject_upgrade(headers: Sequence[tuple[str, str]]) -> tuple[socket.socket, bytes]:
        raise OSError("cannot reach BuildKit through the engine: 404 Not Found")

    return ControlClient(conn.channel, conn.h2_dialer, reject_upgrade)


# each way the session's connection can travel, and the control argument that selects it
TRANSPORTS: dict[str, Callable[[Connection], Any]] = {
    "EngineSession": lambda conn: conn.control,
    "SessionStream": without_session_endpoint,
    "ChannelSession": lambda conn: control_pb2_grpc.ControlStub(conn.channel),
}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_session_transport_uploads_context(
    buildkit_addr: str,
    make_context: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    transport: str,
) -> None:
    context = write_test_context(make_context)
    # larger than the session's batches and BuildKit's first flow-control windows
    large = os.urandom(5 * 1024 * 1024 + 3)
    (context / "large.bin").write_bytes(large)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="bkdbg.gateway.session"):
        solve(
            buildkit_addr,
            context,
            "local",
            Target(0, directory=str(out)),
            control=TRANSPORTS[transport],
        )
    assert f"started on {transport} " in caplog.text
    assert (out / "ctx" / "large.bin").read_bytes() == large
    assert (out / "ctx" / "keep" / "deep" / "kept.log").read_text() == "kept\n"
    assert not (out / "ctx" / "app" / "debug.log").exists()


def test_session_falls_back_without_session_endpoint(
    buildkit_addr: str, make_context: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context = write_test_context(make_context)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="bkdbg.gateway"):
        solve(
            buildkit_addr,
            context,
            "local",
            Target(0, directory=str(out)),
            control=with_failing_session_endpoint,
        )
    assert "POST /session failed, using Control.Session instead: cannot reach" in caplog.text
    assert "started on SessionStream " in caplog.text
    assert (out / "ctx" / "app" / "main.sh").read_text() == "echo main\n"


def test_session_tar_export(buildkit_addr: str, make_context: Any, tmp_path: Path) -> None:
    context = write_test_context(make_context)
    archive = io.BytesIO()
    solve(buildkit_addr, context, "tar", Target(0, stream=archive))

    with tarfile.open(fileobj=io.BytesIO(archive.getvalue())) as tar:
        names = set(tar.getnames())
        main = tar.extractfile("ctx/app/main.sh")
        assert main is not None
        assert main.read() == b"echo main\n"
    assert "ctx/keep/deep/kept.log" in names
    assert "ctx/app/debug.log" not in names


def test_session_secret_mount(
    buildkit_addr: str, make_context: Any, tmp_path: Path, no_leaked_containers: None
) -> None:
    # secret values are not part of BuildKit's cache keys, so the RUN line is made unique
    dockerfile = (
        f"FROM {TEST_IMAGE} AS build\n"
        "RUN --mount=type=secret,id=file --mount=type=secret,id=env "
        f"cat /run/secrets/file /run/secrets/env > /both # {time.time_ns()}\n"
        "FROM scratch\n"
        "COPY --from=build /both /both\n"
    )
    context = make_context(dockerfile)
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"from-file-{time.time_ns()}\n")
    secrets = [SecretSpec("file", src=str(secret_file)), SecretSpec("env", env="X", value="env")]
    out = tmp_path / "out"
    solve(buildkit_addr, context, "local", Target(0, directory=str(out)), secrets)
    assert (out / "both").read_text() == secret_file.read_text() + "env"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_session_survives_health_checks(
    buildkit_addr: str, make_context: Any, tmp_path: Path
) -> None:
    context = make_context("FROM scratch\nCOPY . /ctx/\n", {"late.txt": "late\n"})
    with connect(buildkit_addr) as conn:
        out = tmp_path / "out"
        session = Session(
            conn.control,
            shared_key="survive",
            local_dirs={"context": str(context), "dockerfile": str(context)},
            exports=[Target(0, directory=str(out))],
        )
        with session:
            time.sleep(105)
            assert not session.ended
            request = control_pb2.SolveRequest(
                Ref=f"survive-{session.id}",
                Session=session.id,
                Frontend="dockerfile.v0",
                Exporters=[control_pb2.Exporter(Type="local")],
                ExporterDeprecated="local",
            )
            conn.control.Solve(request, timeout=60)
    assert (out / "ctx" / "late.txt").read_text() == "late\n"


def test_session_start_fails_fast_without_buildkit(tmp_path: Path) -> None:
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'nothing.sock'}")
    session = Session(channel, shared_key="k")
    started = time.monotonic()
    try:
        with pytest.raises(
            BuildkitError, match="Control.Session failed: BuildKit returned UNAVAILABLE"
        ):
            session.start()
    finally:
        session.close()
        channel.close()
    assert time.monotonic() - started < 5
    assert session.ended
