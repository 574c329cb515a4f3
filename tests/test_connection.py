"""Tests for connections to BuildKit: candidates, errors, TLS, the Docker bridge and `info`.

Unit tests use local stand-ins: a fake Docker Engine on a unix socket that accepts the
h2c upgrade and then echoes, a gRPC server with a Control.Info of its own, and a fake
`docker` CLI on PATH. Integration tests (fixture `buildkit_addr`) use the real local BuildKit.
"""

import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from bkdbg.buildkit_proto import control_pb2, control_pb2_grpc, ops_pb2, worker_pb2
from bkdbg.errors import (
    BuildCancelled,
    BuildkitError,
    BuildkitLost,
    BuildkitUnreachable,
    UsageError,
)
from bkdbg.gateway.address import TLSOptions, parse_address
from bkdbg.gateway.connection import START_HINT, connect, map_rpc_error
from bkdbg.gateway.dockerbridge import DockerBridge, dial_session
from bkdbg.gateway.info import BuildkitInfo, WorkerInfo, buildkit_info, format_info

TIMEOUT = 2.0  # seconds, for probes against stand-ins that respond at once or never
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- stand-ins


class FakeEngine:
    """A Docker Engine stand-in on a unix socket: it responds to POST /grpc, then echoes.

    `response` is sent after the request headers; with a 101 status line the server then
    echoes every byte until the client half-closes. `requests` collects the request heads.
    """

    def __init__(self, path: Path, response: bytes) -> None:
        self.path = path
        self.response = response
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head)
            conn.sendall(self.response)
            if b" 101 " not in self.response.split(b"\r\n", 1)[0]:
                return
            while data := conn.recv(256 * 1024):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


UPGRADED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n"
    b'{"message":"page not found"}\n'
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(os.path.realpath(os.path.join("/tmp", os.urandom(4).hex())))
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_engine(sock_dir: Path) -> Iterator[Callable[[bytes], FakeEngine]]:
    engines: list[FakeEngine] = []

    def start(response: bytes) -> FakeEngine:
        engine = FakeEngine(sock_dir / f"engine{len(engines)}.sock", response)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.close()


class InfoServicer(control_pb2_grpc.ControlServicer):
    """Control with only Info and ListWorkers, standing in for BuildKit in unit tests."""

    def Info(self, request, context):
        version = worker_pb2.BuildkitVersion(version="v9.9.9", revision="abc123")
        return control_pb2.InfoResponse(buildkitVersion=version)

    def ListWorkers(self, request, context):
        record = worker_pb2.WorkerRecord(
            ID="w1",
            platforms=[
                ops_pb2.Platform(OS="linux", Architecture="amd64"),
                ops_pb2.Platform(OS="linux", Architecture="arm", Variant="v7"),
            ],
        )
        return control_pb2.ListWorkersResponse(record=[record])


@pytest.fixture
def grpc_server() -> Iterator[Callable[..., tuple[grpc.Server, int]]]:
    """Start gRPC servers on 127.0.0.1 or a unix socket; stop them after the test."""
    servers: list[grpc.Server] = []

    def start(
        target: str = "127.0.0.1:0",
        credentials: grpc.ServerCredentials | None = None,
        control: bool = True,
    ) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if control:
            control_pb2_grpc.add_ControlServicer_to_server(InfoServicer(), server)
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
        server.start()
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        server.stop(None)


def make_socket_file(path: Path) -> Path:
    """Leave a unix socket file at path that nothing listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


def roundtrip(socket_path: str, payload: bytes) -> bytes:
    """Send payload to a unix socket, half-close, and return everything read until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1)))
        sender.start()
        received = bytearray()
        while chunk := sock.recv(256 * 1024):
            received += chunk
        sender.join()
    return bytes(received)


# ---------------------------------------------------------------- connect: errors


def test_connect_nothing_reachable_names_every_address(sock_dir):
    default = make_socket_file(sock_dir / "buildkitd.sock")
    environ = {"DOCKER_HOST": f"unix://{sock_dir}/docker.sock"}
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect(None, timeout=TIMEOUT, environ=environ, default_socket=str(default))
    assert str(excinfo.value) == (
        f"cannot reach BuildKit: tried unix://{default} (connection refused), "
        f"docker://unix://{sock_dir}/docker.sock (no such socket): "
        "start buildkitd or Docker, or pass --addr "
        "(scripts/local-buildkit.sh start runs a local one)"
    )
    assert excinfo.value.addresses == [
        f"unix://{default}",
        f"docker://unix://{sock_dir}/docker.sock",
    ]


def test_connect_default_is_docker_when_no_socket(sock_dir):
    environ = {"DOCKER_HOST": f"unix://{sock_dir}/docker.sock"}
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect(
            None, timeout=TIMEOUT, environ=environ, default_socket=str(sock_dir / "buildkitd.sock")
        )
    assert excinfo.value.addresses == [f"docker://unix://{sock_dir}/docker.sock"]


def test_connect_explicit_missing_socket(sock_dir):
    path = sock_dir / "missing.sock"
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect(f"unix://{path}", timeout=TIMEOUT, environ={})
    assert str(excinfo.value) == (
        f"cannot reach BuildKit: tried unix://{path} (no such socket): {START_HINT}"
    )


def test_connect_buildkit_host_tried_alone(sock_dir):
    default = make_socket_file(sock_dir / "buildkitd.sock")
    environ = {"BUILDKIT_HOST": f"unix://{sock_dir}/env.sock"}
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect(None, timeout=TIMEOUT, environ=environ, default_socket=str(default))
    assert excinfo.value.addresses == [f"unix://{sock_dir}/env.sock"]


def test_connect_invalid_address_is_usage_error():
    with pytest.raises(UsageError, match="unsupported BuildKit address: 'ssh://host'"):
        connect("ssh://host", environ={})


def test_connect_tls_needs_tcp(sock_dir):
    with pytest.raises(UsageError) as excinfo:
        connect(f"unix://{sock_dir}/b.sock", TLSOptions(server_name="bk"), environ={})
    assert str(excinfo.value).startswith(f"TLS options need a tcp:// address: unix://{sock_dir}")


def test_connect_tls_missing_files(sock_dir):
    tls = TLSOptions(ca=str(sock_dir / "ca.pem"))
    with pytest.raises(UsageError, match="TLS file not found: --tlscacert"):
        connect("tcp://127.0.0.1:1", tls, environ={})


def test_connect_http1_server_is_explained(fake_engine):
    engine = fake_engine(NOT_FOUND)
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect(f"unix://{engine.path}", timeout=TIMEOUT, environ={})
    assert "an HTTP/1 server responded, not gRPC: for a Docker Engine use docker://" in str(
        excinfo.value
    )


def test_connect_silent_server_times_out(sock_dir):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_dir / "silent.sock"))
    listener.listen(8)  # the kernel accepts connections, but nothing ever responds
    try:
        with pytest.raises(BuildkitUnreachable, match=r"\(no response within 0.5 s\)"):
            connect(f"unix://{sock_dir}/silent.sock", timeout=0.5, environ={})
    finally:
        listener.close()


# ---------------------------------------------------------------- connect: tcp, TLS, unix


def test_connect_plain_tcp_warns(grpc_server, caplog):
    _, port = grpc_server()
    with connect(f"tcp://127.0.0.1:{port}", timeout=TIMEOUT, environ={}) as conn:
        assert conn.address == f"tcp://127.0.0.1:{port}"
        assert len(conn.warnings) == 1
        assert conn.warnings[0].startswith(
            f"connecting to BuildKit at tcp://127.0.0.1:{port} without TLS"
        )
    assert conn.warnings[0] in caplog.text


def test_connect_unix_gets_info(grpc_server, sock_dir):
    grpc_server(f"unix:{sock_dir}/bk.sock")
    with connect(f"unix://{sock_dir}/bk.sock", timeout=TIMEOUT, environ={}) as conn:
        info = buildkit_info(conn)
    assert conn.warnings == []
    assert info == BuildkitInfo(
        "v9.9.9", "abc123", [WorkerInfo("w1", ["linux/amd64", "linux/arm/v7"])]
    )


def test_connect_default_socket_first(grpc_server, sock_dir):
    grpc_server(f"unix:{sock_dir}/buildkitd.sock")
    environ = {"DOCKER_HOST": f"unix://{sock_dir}/docker.sock"}
    with connect(
        None, timeout=TIMEOUT, environ=environ, default_socket=str(sock_dir / "buildkitd.sock")
    ) as conn:
        assert conn.address == f"unix://{sock_dir}/buildkitd.sock"


def test_connect_accepts_buildkit_without_info(grpc_server, sock_dir):
    grpc_server(f"unix:{sock_dir}/old.sock", control=False)
    with connect(f"unix://{sock_dir}/old.sock", timeout=TIMEOUT, environ={}) as conn:
        assert conn.address == f"unix://{sock_dir}/old.sock"


def make_certificates(directory: Path) -> dict[str, Path]:
    """Write a CA, a server certificate for buildkit.test and a client certificate."""
    paths = {
        name: directory / f"{name}.pem"
        for name in ("ca", "ca-key", "server", "server-key", "client", "client-key")
    }

    def run(command: str) -> None:
        # the paths come from tmp_path and contain no spaces
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True, timeout=60)

    ca, ca_key = paths["ca"], paths["ca-key"]
    run(f"req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout {ca_key} -out {ca}")
    extensions = {
        "server": "subjectAltName=DNS:buildkit.test",
        "client": "extendedKeyUsage=clientAuth",
    }
    for name, extension in extensions.items():
        key, csr, extfile = paths[f"{name}-key"], directory / f"{name}.csr", directory / "ext"
        extfile.write_text(extension + "\n")
        run(f"req -newkey rsa:2048 -nodes -subj /CN={name} -keyout {key} -out {csr}")
        run(
            f"x509 -req -days 1 -CAcreateserial -in {csr} -CA {ca} -CAkey {ca_key} "
            f"-extfile {extfile} -out {paths[name]}"
        )
    return paths


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_connect_tcp_mutual_tls(grpc_server, tmp_path):
    paths = make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(paths["server-key"].read_bytes(), paths["server"].read_bytes())],
        root_certificates=paths["ca"].read_bytes(),
        require_client_auth=True,
    )
    _, port = grpc_server("127.0.0.1:0", credentials)
    tls = TLSOptions(
        ca=str(paths["ca"]),
        cert=str(paths["client"]),
        key=str(paths["client-key"]),
        server_name="buildkit.test",
    )
    with connect(f"tcp://127.0.0.1:{port}", tls, timeout=5.0, environ={}) as conn:
        assert conn.warnings == []
        assert buildkit_info(conn).version == "v9.9.9"

    # without the client certificate the server rejects the handshake
    no_client = TLSOptions(ca=str(paths["ca"]), server_name="buildkit.test")
    with pytest.raises(BuildkitUnreachable, match=f"tried tcp://127.0.0.1:{port}"):
        connect(f"tcp://127.0.0.1:{port}", no_client, timeout=TIMEOUT, environ={})


# ---------------------------------------------------------------- map_rpc_error


class FakeCall(grpc.RpcError, grpc.Call):
    """An RPC error with a status code and details, as grpcio raises from a failed call."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


@pytest.mark.parametrize(
    ("code", "cls", "message"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            BuildkitLost,
            "Control.Solve failed: BuildKit at unix:///bk.sock is unavailable (gone): "
            "check that BuildKit still runs and retry",
        ),
        (grpc.StatusCode.CANCELLED, BuildCancelled, "Control.Solve cancelled: gone"),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            BuildkitError,
            "Control.Solve timed out: BuildKit at unix:///bk.sock did not respond in time: retry, "
            "or check the BuildKit daemon's load and log",
        ),
        (
            grpc.StatusCode.UNIMPLEMENTED,
            BuildkitError,
            "Control.Solve not supported: BuildKit at unix:///bk.sock does not implement it "
            "(gone): use a newer BuildKit",
        ),
        (
            grpc.StatusCode.INTERNAL,
            BuildkitError,
            "Control.Solve failed: BuildKit at unix:///bk.sock returned INTERNAL: gone",
        ),
    ],
)
def test_map_rpc_error(code, cls, message):
    error = map_rpc_error(FakeCall(code, "gone"), "Control.Solve", "unix:///bk.sock")
    assert type(error) is cls
    assert str(error) == message


# ---------------------------------------------------------------- DockerBridge


def test_bridge_upgrades_and_echoes(fake_engine):
    engine = fake_engine(UPGRADED + b"early")
    bridge = DockerBridge(parse_address(f"docker://unix://{engine.path}"), timeout=TIMEOUT)
    bridge.start()
    try:
        payload = os.urandom(3 * 1024 * 1024 + 17)
        assert roundtrip(bridge.socket_path, payload) == b"early" + payload
    finally:
        bridge.close()
    request = engine.requests[-1].decode()
    assert request.startswith("POST /grpc HTTP/1.1\r\n")
    assert "\r\nConnection: Upgrade\r\n" in request
    assert "\r\nUpgrade: h2c\r\n" in request
    assert "\r\nHost: " in request


def test_dial_session_sends_session_headers(fake_engine):
    engine = fake_engine(UPGRADED + b"preface")
    headers = [
        ("x-docker-expose-session-uuid", "abc123"),
        ("x-docker-expose-session-grpc-method", "/a.A/One"),
        ("x-docker-expose-session-grpc-method", "/a.A/Two"),
    ]
    sock, initial = dial_session(
        parse_address(f"docker://unix://{engine.path}"), TIMEOUT, headers
    )
    with sock:
        assert initial == b"preface"
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
    request = engine.requests[-1].decode()
    assert request.startswith("POST /session HTTP/1.1\r\n")
    assert "\r\nUpgrade: h2c\r\n" in request
    assert "\r\nx-docker-expose-session-uuid: abc123\r\n" in request
    assert "\r\nx-docker-expose-session-grpc-method: /a.A/One\r\n" in request
    assert "\r\nx-docker-expose-session-grpc-method: /a.A/Two\r\n" in request


def test_dial_session_404_names_endpoint(fake_engine):
    engine = fake_engine(NOT_FOUND)
    address = parse_address(f"docker://unix://{engine.path}")
    with pytest.raises(OSError) as excinfo:
        dial_session(address, TIMEOUT, [("x-docker-expose-session-uuid", "abc123")])
    assert str(excinfo.value) == (
        f"cannot reach BuildKit through {address}: the engine returned "
        "'HTTP/1.1 404 Not Found' to POST /session instead of 101 Switching Protocols, "
        "so it has no session endpoint"
    )


def test_dial_session_rejects_line_break_in_header(fake_engine):
    engine = fake_engine(UPGRADED)
    address = parse_address(f"docker://unix://{engine.path}")
    with pytest.raises(ValueError, match="a line break in a header"):
        dial_session(address, TIMEOUT, [("x-docker-expose-session-name", "a\r\nX: y")])
    assert engine.requests == []


def test_bridge_socket_is_private(fake_engine):
    engine = fake_engine(UPGRADED)
    bridge = DockerBridge(parse_address(f"docker://unix://{engine.path}"), timeout=TIMEOUT)
    bridge.start()
    try:
        directory = Path(bridge.socket_path).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert bridge.target == f"unix:{bridge.socket_path}"
    finally:
        bridge.close()
    assert not directory.exists()


def test_bridge_404_is_clear_error(fake_engine):
    engine = fake_engine(NOT_FOUND)
    bridge = DockerBridge(parse_address(f"docker://unix://{engine.path}"), timeout=TIMEOUT)
    with pytest.raises(BuildkitUnreachable) as excinfo:
        bridge.start()
    assert str(excinfo.value) == (
        f"cannot reach BuildKit: docker://unix://{engine.path}: the engine returned "
        "'HTTP/1.1 404 Not Found' to POST /grpc instead of 101 Switching Protocols, so it has "
        "no BuildKit: start Docker, or pass --addr "
        "(scripts/local-buildkit.sh start runs a local one)"
    )
    assert not Path(bridge.socket_path).parent.exists()


def test_connect_404_engine_names_status(fake_engine):
    engine = fake_engine(NOT_FOUND)
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect(f"docker://unix://{engine.path}", timeout=TIMEOUT, environ={})
    assert str(excinfo.value) == (
        f"cannot reach BuildKit: tried docker://unix://{engine.path} (the engine returned "
        "'HTTP/1.1 404 Not Found' to POST /grpc instead of 101 Switching Protocols, so it has "
        f"no BuildKit): {START_HINT}"
    )


def test_bridge_engine_closes_during_upgrade(fake_engine):
    engine = fake_engine(b"HTTP/1.1 101")  # then the connection closes
    bridge = DockerBridge(parse_address(f"docker://unix://{engine.path}"), timeout=TIMEOUT)
    with pytest.raises(BuildkitUnreachable, match="closed the connection during the h2c upgrade"):
        bridge.start()


def test_bridge_close_ends_live_connections(fake_engine):
    engine = fake_engine(UPGRADED)
    bridge = DockerBridge(parse_address(f"docker://unix://{engine.path}"), timeout=TIMEOUT)
    bridge.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(bridge.socket_path)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        bridge.close()
        assert client.recv(16) == b""
    names = [thread.name for thread in threading.enumerate()]
    assert "bridge-accept" not in names


def write_fake_docker(directory: Path, body: str) -> Path:
    """Put an executable `docker` in directory that runs the Python code `body`."""
    script = directory / "docker"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def test_bridge_container_runs_docker_exec(tmp_path, monkeypatch):
    write_fake_docker(
        tmp_path,
        """\
        import os, sys
        with open(os.environ["ARGV_FILE"], "w") as f:
            f.write(" ".join(sys.argv[1:]))
        while data := os.read(0, 65536):
            os.write(1, data)
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ARGV_FILE", str(tmp_path / "argv"))
    bridge = DockerBridge(parse_address("docker-container://bk?context=ctx"), timeout=TIMEOUT)
    bridge.start()
    try:
        payload = os.urandom(1024 * 1024)
        assert roundtrip(bridge.socket_path, payload) == payload
    finally:
        bridge.close()
    argv = (tmp_path / "argv").read_text()
    assert argv == "--context=ctx exec -i bk buildctl dial-stdio"
    assert bridge.last_error is None


def test_connect_container_failure_names_stderr(tmp_path, monkeypatch):
    write_fake_docker(
        tmp_path,
        """\
        import sys
        print("Error response from daemon: No such container: bk", file=sys.stderr)
        sys.exit(1)
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BuildkitUnreachable) as excinfo:
        connect("docker-container://bk", timeout=TIMEOUT, environ={})
    assert str(excinfo.value) == (
        "cannot reach BuildKit: tried docker-container://bk (docker exec failed: "
        f"Error response from daemon: No such container: bk): {START_HINT}"
    )


def test_connect_container_without_docker_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildkitUnreachable, match=r"\(docker CLI not found on PATH\)"):
        connect("docker-container://bk", timeout=TIMEOUT, environ={})


# ---------------------------------------------------------------- format_info


def test_format_info_lines():
    info = BuildkitInfo(
        "v0.13.2", "abc", [WorkerInfo("w1", ["linux/amd64", "linux/386"]), WorkerInfo("w2", [])]
    )
    assert format_info("0.1.0", "docker://unix:///d.sock", info) == [
        "Client:    bkdbg 0.1.0",
        "Address:   docker://unix:///d.sock",
        "BuildKit:  v0.13.2 (revision abc)",
        "Workers:   2",
        "  w1: linux/amd64, linux/386",
        "  w2: no platforms",
    ]


def test_format_info_without_version():
    lines = format_info("0.1.0", "unix:///b.sock", BuildkitInfo("", "", []))
    assert lines[2] == "BuildKit:  unknown"


# ---------------------------------------------------------------- integration


def machine_platform() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(
        platform.machine(), platform.machine()
    )
    return f"linux/{arch}"


def test_info_through_docker(buildkit_addr):
    with connect(buildkit_addr, timeout=10.0, environ={}) as conn:
        info = buildkit_info(conn)
    assert conn.address == parse_address(buildkit_addr, environ={}).text
    assert conn.warnings == []
    assert info.version
    assert info.workers
    assert machine_platform() in info.workers[0].platforms


def test_default_resolution_reaches_docker_host(buildkit_addr, sock_dir):
    engine = parse_address(buildkit_addr, environ={})
    if engine.scheme != "docker":
        pytest.skip(f"needs a docker:// test address, not {buildkit_addr}")
    environ = {"DOCKER_HOST": engine.engine_url}
    with connect(
        None, timeout=10.0, environ=environ, default_socket=str(sock_dir / "buildkitd.sock")
    ) as conn:
        assert conn.address == engine.text
        assert buildkit_info(conn).workers


def test_info_through_docker_container_helper(buildkit_addr, tmp_path, monkeypatch):
    # a `docker` that behaves like `docker exec -i NAME buildctl dial-stdio`: it splices its
    # stdin and stdout to the test engine's BuildKit, so the process path runs real gRPC
    engine = parse_address(buildkit_addr, environ={})
    if engine.scheme != "docker":
        pytest.skip(f"needs a docker:// test address, not {buildkit_addr}")
    write_fake_docker(
        tmp_path,
        f"""\
        import os, sys, threading
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from bkdbg.gateway.address import parse_address
        from bkdbg.gateway.dockerbridge import open_engine, pump

        class Stdio:
            def recv_into(self, buffer):
                return os.readv(0, [buffer])
            def send_all(self, data):
                while data:
                    data = data[os.write(1, data):]
            def end_write(self):
                os.close(1)
            def close(self):
                pass

        upstream = open_engine(parse_address({buildkit_addr!r}, environ={{}}), 10.0)
        stdio = Stdio()
        threading.Thread(target=pump, args=(stdio, upstream, "in"), daemon=True).start()
        pump(upstream, stdio, "out")
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with connect("docker-container://bk", timeout=10.0, environ={}) as conn:
        info = buildkit_info(conn)
    assert machine_platform() in info.workers[0].platforms
