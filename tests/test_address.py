"""Tests for BuildKit address parsing, TLS options and the default resolution order."""

import socket
from pathlib import Path

import pytest

from bkdbg.errors import UsageError
from bkdbg.gateway.address import (
    DEFAULT_DOCKER_HOST,
    Address,
    TLSOptions,
    candidate_addresses,
    parse_address,
)

SCHEME_HINT = "use unix:///PATH, tcp://HOST:PORT, docker://[unix:///PATH], docker-container://NAME"


def make_socket_file(path: Path) -> Path:
    """Leave a unix socket file at path (bound, then closed: nothing listens on it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


# ---------------------------------------------------------------- parse_address


def test_parse_unix():
    address = parse_address("unix:///run/buildkit/buildkitd.sock")
    assert address == Address(
        "unix", "unix:///run/buildkit/buildkitd.sock", path="/run/buildkit/buildkitd.sock"
    )
    assert address.text == "unix:///run/buildkit/buildkitd.sock"


def test_parse_tcp():
    address = parse_address("tcp://buildkit.example:1234")
    assert address.scheme == "tcp"
    assert address.host == "buildkit.example"
    assert address.port == 1234
    assert address.text == "tcp://buildkit.example:1234"


def test_parse_tcp_ipv6():
    address = parse_address("tcp://[::1]:1234")
    assert address.host == "::1"
    assert address.port == 1234
    assert address.text == "tcp://[::1]:1234"


def test_parse_docker_default_engine():
    address = parse_address("docker://", environ={})
    assert address.scheme == "docker"
    assert address.path == "/var/run/docker.sock"
    assert address.text == f"docker://{DEFAULT_DOCKER_HOST}"


def test_parse_docker_empty_docker_host_is_default():
    address = parse_address("docker://", environ={"DOCKER_HOST": ""})
    assert address.path == "/var/run/docker.sock"


def test_parse_docker_from_docker_host_unix():
    address = parse_address("docker://", environ={"DOCKER_HOST": "unix:///tmp/d.sock"})
    assert address.path == "/tmp/d.sock"
    assert address.raw == "docker://"
    assert address.text == "docker://unix:///tmp/d.sock"


def test_parse_docker_from_docker_host_tcp():
    address = parse_address("docker://", environ={"DOCKER_HOST": "tcp://10.0.0.5:2375"})
    assert address.path is None
    assert address.host == "10.0.0.5"
    assert address.port == 2375
    assert address.text == "docker://tcp://10.0.0.5:2375"


def test_parse_docker_explicit_engine_ignores_docker_host():
    address = parse_address(
        "docker://unix:///run/bkdbg-buildkit/docker.sock",
        environ={"DOCKER_HOST": "unix:///elsewhere.sock"},
    )
    assert address.path == "/run/bkdbg-buildkit/docker.sock"
    assert address.text == "docker://unix:///run/bkdbg-buildkit/docker.sock"


def test_parse_docker_explicit_tcp_engine():
    address = parse_address("docker://tcp://127.0.0.1:2375", environ={})
    assert (address.host, address.port) == ("127.0.0.1", 2375)


def test_parse_docker_tls_engine_rejected():
    environ = {"DOCKER_HOST": "tcp://10.0.0.5:2376", "DOCKER_TLS_VERIFY": "1"}
    with pytest.raises(UsageError, match="DOCKER_TLS_VERIFY is set"):
        parse_address("docker://", environ=environ)


@pytest.mark.parametrize("docker_host", ["ssh://user@host", "npipe:////./pipe/docker", "fd://"])
def test_parse_docker_unsupported_docker_host(docker_host):
    with pytest.raises(UsageError) as excinfo:
        parse_address("docker://", environ={"DOCKER_HOST": docker_host})
    assert str(excinfo.value) == (
        f"unsupported Docker Engine address in DOCKER_HOST: {docker_host!r}: "
        "use unix:///PATH or tcp://HOST:PORT"
    )


def test_parse_docker_container():
    address = parse_address("docker-container://buildx_buildkit_default")
    assert address.scheme == "docker-container"
    assert address.container == "buildx_buildkit_default"
    assert address.docker_context is None
    assert address.text == "docker-container://buildx_buildkit_default"


def test_parse_docker_container_with_context():
    address = parse_address("docker-container://bk?context=remote")
    assert address.container == "bk"
    assert address.docker_context == "remote"
    assert address.text == "docker-container://bk?context=remote"


@pytest.mark.parametrize(
    "text",
    ["ssh://host", "http://localhost:1234", "/run/buildkit/buildkitd.sock", "buildkitd", ""],
)
def test_parse_unknown_scheme(text):
    with pytest.raises(UsageError) as excinfo:
        parse_address(text)
    assert str(excinfo.value) == f"unsupported BuildKit address: {text!r}: {SCHEME_HINT}"


@pytest.mark.parametrize("text", ["unix://relative.sock", "unix://", "unix:///"])
def test_parse_unix_needs_absolute_path(text):
    with pytest.raises(UsageError, match="invalid unix socket address"):
        parse_address(text)


@pytest.mark.parametrize(
    "text", ["tcp://host", "tcp://:1234", "tcp://host:port", "tcp://host:99999", "tcp://h:1/x"]
)
def test_parse_tcp_needs_host_and_port(text):
    with pytest.raises(UsageError) as excinfo:
        parse_address(text)
    assert str(excinfo.value) == f"invalid tcp address: {text!r}: use tcp://HOST:PORT"


@pytest.mark.parametrize("text", ["docker-container://", "docker-container://name/extra"])
def test_parse_docker_container_needs_name(text):
    with pytest.raises(UsageError, match="use docker-container://NAME"):
        parse_address(text)


# ---------------------------------------------------------------- TLSOptions


def test_tls_enabled_by_any_option():
    assert not TLSOptions().enabled
    assert TLSOptions(server_name="buildkit.test").enabled
    assert TLSOptions(ca="/ca.pem").enabled


def test_tls_validate_accepts_existing_files(tmp_path):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    TLSOptions(
        ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem")
    ).validate()


def test_tls_validate_names_every_missing_file(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    ca, cert, key = (str(tmp_path / name) for name in ("ca.pem", "cert.pem", "key.pem"))
    with pytest.raises(UsageError) as excinfo:
        TLSOptions(ca=ca, cert=cert, key=key).validate()
    assert str(excinfo.value) == (
        f"TLS file not found: --tlscacert {ca}, --tlskey {key}: check the paths of these options"
    )


@pytest.mark.parametrize("given", ["cert", "key"])
def test_tls_validate_needs_cert_and_key_together(tmp_path, given):
    path = tmp_path / "file.pem"
    path.write_text("x")
    with pytest.raises(UsageError, match="--tlscert and --tlskey must be given together"):
        TLSOptions(**{given: str(path)}).validate()


# ---------------------------------------------------------------- candidate_addresses


def test_candidates_explicit_alone(tmp_path):
    default = make_socket_file(tmp_path / "buildkitd.sock")
    environ = {"BUILDKIT_HOST": "tcp://127.0.0.1:1234"}
    assert candidate_addresses("unix:///x.sock", environ, str(default)) == ["unix:///x.sock"]


def test_candidates_buildkit_host_alone(tmp_path):
    default = make_socket_file(tmp_path / "buildkitd.sock")
    environ = {"BUILDKIT_HOST": "tcp://127.0.0.1:1234"}
    assert candidate_addresses(None, environ, str(default)) == ["tcp://127.0.0.1:1234"]


def test_candidates_default_socket_then_docker(tmp_path):
    default = make_socket_file(tmp_path / "buildkitd.sock")
    assert candidate_addresses(None, {}, str(default)) == [f"unix://{default}", "docker://"]


def test_candidates_docker_when_no_default_socket(tmp_path):
    assert candidate_addresses(None, {}, str(tmp_path / "missing.sock")) == ["docker://"]


def test_candidates_default_must_be_a_socket(tmp_path):
    regular = tmp_path / "buildkitd.sock"
    regular.write_text("not a socket")
    assert candidate_addresses(None, {}, str(regular)) == ["docker://"]


def test_candidates_empty_values_fall_through(tmp_path):
    environ = {"BUILDKIT_HOST": ""}
    assert candidate_addresses("", environ, str(tmp_path / "missing.sock")) == ["docker://"]
