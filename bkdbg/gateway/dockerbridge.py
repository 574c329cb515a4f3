"""A private unix socket that grpcio dials to reach BuildKit through Docker.

grpcio cannot dial through an HTTP upgrade or through a child process. So `DockerBridge`
listens on a unix socket in a private 0700 directory, and for each connection that grpcio
opens there it opens a connection to BuildKit and splices the two byte streams:

* ``docker://``: a connection to the engine's socket (unix or TCP) that sends
  ``POST /grpc`` with ``Upgrade: h2c``. After ``101 Switching Protocols`` the engine
  serves BuildKit's gRPC on it. moby now marks ``/grpc`` deprecated in favour of HTTP/2 on
  the API socket itself, but Docker Engine 26 serves BuildKit only this way.
* ``docker-container://NAME``: a ``docker exec -i NAME buildctl dial-stdio`` process,
  whose stdin and stdout carry BuildKit's gRPC (buildctl's docker-container connection helper).

The interactive keystroke path runs through the bridge, so each direction is one thread that
copies with a 256 KiB buffer and no extra framing.

`dial_engine` (``POST /grpc``) and `dial_session` (``POST /session``) return upgraded
connections to callers that speak HTTP/2 themselves, without the bridge.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Protocol

from bkdbg.errors import BuildkitUnreachable
from bkdbg.gateway.address import Address

logger = logging.getLogger(__name__)

BUFFER_SIZE = 256 * 1024
MAX_RESPONSE_HEADER = 64 * 1024  # max bytes of the upgrade response's status line and headers
PROCESS_EXIT_TIMEOUT = 5.0  # seconds to wait for `docker exec` to exit after its stdout ends
CLOSE_JOIN_TIMEOUT = 2.0  # seconds that close() waits for each bridge thread to end
_MAX_UNIX_PATH = 100  # sockaddr_un has room for 107 bytes and a NUL, file name included

_UPGRADE_REQUEST = (
    "POST {path} HTTP/1.1\r\n"
    "Host: {host}\r\n"
    "User-Agent: bkdbg\r\n"
    "Content-Length: 0\r\n"
    "Connection: Upgrade\r\n"
    "Upgrade: h2c\r\n"
    "{headers}"
    "\r\n"
)
GRPC_PATH = "/grpc"  # BuildKit's gRPC API (Control, LLBBridge)
# Docker Engine's session endpoint: after the upgrade the connection carries the client
# session's own HTTP/2 connection, with BuildKit as the client (Engine API POST /session)
SESSION_PATH = "/session"


class Stream(Protocol):
    """One end of a spliced connection: a socket or a child process's stdin and stdout."""

    def recv_into(self, buffer: memoryview) -> int: ...

    def send_all(self, data: memoryview) -> None: ...

    def end_write(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class ExitHook(Protocol):
    """Called with the exit status and stderr of a `docker exec` process."""

    def __call__(self, code: int, stderr: str) -> None: ...


def pump(source: Stream, sink: Stream, label: str) -> int:
    """Copy bytes from `source` to `sink` until EOF or an error, then end `sink`'s writing.

    Returns the number of bytes copied. Errors end the copy and are logged at DEBUG,
    because a peer that hangs up is how every connection ends.
    """
    buffer = memoryview(bytearray(BUFFER_SIZE))
    total = 0
    try:
        while True:
            count = source.recv_into(buffer)
            if not count:
                break
            sink.send_all(buffer[:count])
            total += count
    except OSError as exc:
        logger.debug("bridge %s: copy ended: %s", label, exc)
    finally:
        sink.end_write()
    logger.debug("bridge %s: EOF after %d bytes", label, total)
    return total


class SocketStream:
    """A connected socket as a `Stream`; `initial` contains bytes already read from it."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self._initial = initial

    def recv_into(self, buffer: memoryview) -> int:
        if self._initial:
            count = min(len(self._initial), len(buffer))
            buffer[:count] = self._initial[:count]
            self._initial = self._initial[count:]
            return count
        return self.sock.recv_into(buffer)

    def send_all(self, data: memoryview) -> None:
        self.sock.sendall(data)

    def end_write(self) -> None:
        _quiet_shutdown(self.sock, socket.SHUT_WR)

    def abort(self) -> None:
        """End both directions, waking a pump blocked on this socket (close follows later)."""
        _quiet_shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.abort()
        self.sock.close()


class ProcessStream:
    """A `docker exec ... buildctl dial-stdio` process as a `Stream`.

    At EOF of its stdout, `recv_into` waits for the process to exit and passes its exit
    status and stderr to `on_exit`, so that a failure is recorded before the peer gets EOF.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr: IO[bytes], on_exit: ExitHook):
        self.process = process
        self._stderr = stderr
        self._on_exit = on_exit
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout

    def recv_into(self, buffer: memoryview) -> int:
        count = os.readv(self._stdout.fileno(), [buffer])
        if not count:
            self._report_exit()
        return count

    def send_all(self, data: memoryview) -> None:
        while data:
            written = os.write(self._stdin.fileno(), data)
            data = data[written:]

    def end_write(self) -> None:
        try:
            self._stdin.close()
        except OSError as exc:  # the process has exited and the pipe is broken
            logger.debug("bridge: closing stdin of pid %d: %s", self.process.pid, exc)

    def abort(self) -> None:
        """Close stdin and terminate the process, which ends its stdout too."""
        self.end_write()
        if self.process.poll() is None:
            self.process.terminate()

    def close(self) -> None:
        self.abort()
        try:
            self.process.wait(PROCESS_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stdout.close()
        self._stderr.close()

    def _report_exit(self) -> None:
        try:
            code = self.process.wait(PROCESS_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            return
        self._stderr.seek(0)
        self._on_exit(code, self._stderr.read().decode(errors="replace"))


class DockerBridge:
    """A private unix socket whose connections are spliced to BuildKit behind Docker.

    `start()` checks that the upstream can be opened, then accepts in a daemon thread.
    `target` is the grpc target to dial, and `last_error` the reason the latest upstream
    connection failed (None when none failed). `close()` stops accepting, closes every live
    connection and removes the socket's directory.
    """

    def __init__(self, address: Address, timeout: float = 5.0) -> None:
        if address.scheme not in ("docker", "docker-container"):
            raise ValueError(f"DockerBridge needs a docker or docker-container address: {address}")
        self.address = address
        self.timeout = timeout
        self.last_error: str | None = None
        self._dir = Path(_private_dir())
        self.socket_path = str(self._dir / "buildkit.sock")
        self._listener: socket.socket | None = None
        self._live: set[Stream] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0

    @property
    def target(self) -> str:
        """The grpc target of the bridge socket."""
        return f"unix:{self.socket_path}"

    def start(self) -> None:
        """Check the upstream once, then listen and accept in a daemon thread.

        Raises BuildkitUnreachable naming the address and the reason when the engine
        cannot be reached or rejects the upgrade, or when the docker CLI is missing.
        """
        self._check_upstream()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        listener.listen(16)
        self._listener = listener
        self._start_thread(self._accept_loop, (), "bridge-accept")
        logger.debug("bridge for %s listening on %s", self.address, self.socket_path)

    def close(self) -> None:
        """Stop accepting, close every live connection and remove the socket directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
            threads = list(self._threads)
        if self._listener is not None:
            # shutdown wakes the accept() blocked in the accept thread (Linux)
            _quiet_shutdown(self._listener, socket.SHUT_RDWR)
        # abort rather than close: the connection's own thread closes the file descriptors
        # once its pumps have stopped using them
        for stream in live:
            stream.abort()
        for thread in threads:
            thread.join(CLOSE_JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        logger.debug("bridge for %s closed, %d live connections ended", self.address, len(live))

    # ---------------------------------------------------------------- upstream

    def _check_upstream(self) -> None:
        try:
            if self.address.scheme == "docker":
                upstream = open_engine(self.address, self.timeout)
                upstream.close()
            elif shutil.which("docker") is None:
                raise _UpstreamError("docker CLI not found on PATH")
        except _UpstreamError as exc:
            self.last_error = str(exc)
            self.close()
            raise BuildkitUnreachable(
                f"cannot reach BuildKit: {self.address}: {exc}: {_hint(self.address)}",
                [self.address.text],
            ) from exc

    def _open_upstream(self, number: int) -> Stream:
        if self.address.scheme == "docker":
            return open_engine(self.address, self.timeout)
        return open_container(self.address, self._dir / f"exec-{number}.stderr", self._exited)

    def _exited(self, code: int, stderr: str) -> None:
        if code == 0:
            return
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {code}"
        self.last_error = f"docker exec failed: {detail}"
        logger.warning("bridge for %s: docker exec exited with %d: %s", self.address, code, detail)

    # ---------------------------------------------------------------- connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError as exc:
                if self._closed:
                    break  # close() shut the listener down
                logger.warning("bridge for %s: accept failed: %s", self.address, exc)
                time.sleep(0.1)  # for example out of file descriptors: retry, do not spin
                continue
            self._count += 1
            self._start_thread(self._serve, (client, self._count), f"bridge-conn-{self._count}")

    def _start_thread(
        self, target: Callable[..., object], args: tuple[object, ...], name: str
    ) -> None:
        thread = threading.Thread(
            target=self._run_thread, args=(target, args), name=name, daemon=True
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run_thread(self, target: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve(self, client_sock: socket.socket, number: int) -> None:
        client = SocketStream(client_sock)
        try:
            upstream = self._open_upstream(number)
        except _UpstreamError as exc:
            self.last_error = str(exc)
            logger.warning("bridge for %s: connection %d failed: %s", self.address, number, exc)
            client.close()
            return
        if not self._track(client, upstream):
            return
        self._splice(client, upstream, number)

    def _track(self, client: Stream, upstream: Stream) -> bool:
        with self._lock:
            if not self._closed:
                self._live.update((client, upstream))
                return True
        client.close()
        upstream.close()
        return False

    def _splice(self, client: Stream, upstream: Stream, number: int) -> None:
        # the two directions end independently: each pump half-closes its sink at EOF
        sender = threading.Thread(
            target=pump,
            args=(client, upstream, f"{number} -->"),
            name=f"bridge-conn-{number}-up",
            daemon=True,
        )
        sender.start()
        pump(upstream, client, f"{number} <--")
        sender.join()
        with self._lock:
            self._live.difference_update((client, upstream))
        client.close()
        upstream.close()


class _UpstreamError(Exception):
    """The reason an upstream connection could not be opened, in a few words."""


def open_engine(
    address: Address,
    timeout: float,
    path: str = GRPC_PATH,
    headers: Sequence[tuple[str, str]] = (),
) -> SocketStream:
    """Connect to the Docker Engine of a ``docker://`` address and upgrade `path` to h2c.

    `headers` are added to the request. Returns the upgraded connection, carrying any
    bytes the engine sent after its response headers. Raises _UpstreamError when the
    engine cannot be reached or rejects the upgrade.
    """
    request = _UPGRADE_REQUEST.format(
        path=path,
        host="docker" if address.path else f"{address.host}:{address.port}",
        headers="".join(_header_line(name, value) for name, value in headers),
    )
    sock = _connect_engine(address, timeout)
    try:
        sock.sendall(request.encode())
        initial = _read_upgrade_response(sock, path)
    except _UpstreamError:
        sock.close()
        raise
    except TimeoutError as exc:
        sock.close()
        raise _UpstreamError(f"POST {path} timed out after {timeout:g} s") from exc
    except OSError as exc:
        sock.close()
        raise _UpstreamError(f"POST {path} failed: {_os_reason(exc)}") from exc
    sock.settimeout(None)
    return SocketStream(sock, initial)


def _header_line(name: str, value: str) -> str:
    if any(char in "\r\n" for char in name + value):
        raise ValueError(f"invalid HTTP header {name!r}: {value!r}: a line break in a header")
    return f"{name}: {value}\r\n"


def dial_engine(address: Address, timeout: float) -> tuple[socket.socket, bytes]:
    """Return a connection to BuildKit through the engine's ``POST /grpc`` upgrade.

    The second item is what the engine sent after its response headers, the start of
    its HTTP/2 stream. Raises OSError naming the reason when the upgrade fails.
    """
    return _dial(address, timeout, GRPC_PATH, ())


def dial_session(
    address: Address, timeout: float, headers: Sequence[tuple[str, str]]
) -> tuple[socket.socket, bytes]:
    """Return a connection for a client session through the engine's ``POST /session``.

    `headers` are the session's ``x-docker-expose-session-*`` pairs, which BuildKit reads
    there as it reads them from `Control.Session`'s metadata. On the connection BuildKit
    is the HTTP/2 client of the session's services; the second item is what the engine
    sent after its response headers. Raises OSError naming the reason when the upgrade
    fails.
    """
    return _dial(address, timeout, SESSION_PATH, headers)


def _dial(
    address: Address, timeout: float, path: str, headers: Sequence[tuple[str, str]]
) -> tuple[socket.socket, bytes]:
    try:
        upstream = open_engine(address, timeout, path, headers)
    except _UpstreamError as exc:
        raise OSError(f"cannot reach BuildKit through {address}: {exc}") from exc
    initial, upstream._initial = upstream._initial, b""
    return upstream.sock, initial


def _connect_engine(address: Address, timeout: float) -> socket.socket:
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address.path)
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((address.host or "", address.port or 0), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except TimeoutError as exc:
        raise _UpstreamError(f"connection timed out after {timeout:g} s") from exc
    except FileNotFoundError as exc:
        raise _UpstreamError("no such socket") from exc
    except OSError as exc:
        raise _UpstreamError(_os_reason(exc)) from exc


def _read_upgrade_response(sock: socket.socket, path: str) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise _UpstreamError("the engine closed the connection during the h2c upgrade")
        data += chunk
        if len(data) > MAX_RESPONSE_HEADER:
            raise _UpstreamError(f"the engine's response to POST {path} has no end of headers")
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        missing = "BuildKit" if path == GRPC_PATH else "session endpoint"
        raise _UpstreamError(
            f"the engine returned {status_line!r} to POST {path} instead of "
            "101 Switching Protocols"
            + (f", so it has no {missing}" if len(parts) > 1 and parts[1] == "404" else "")
        )
    return rest


def open_container(address: Address, stderr_path: Path, on_exit: ExitHook) -> ProcessStream:
    """Start ``docker exec -i NAME buildctl dial-stdio`` for a ``docker-container://`` address.

    Its stderr goes to `stderr_path`, which `on_exit` receives when the process fails.
    """
    argv = ["docker"]
    if address.docker_context:
        argv.append(f"--context={address.docker_context}")
    argv += ["exec", "-i", address.container or "", "buildctl", "dial-stdio"]
    stderr = open(stderr_path, "w+b")  # ProcessStream.close closes it
    os.unlink(stderr_path)  # the open file descriptor keeps it readable until closed
    try:
        # a new session keeps a terminal's Ctrl-C from killing the connection under us
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=0,
            start_new_session=True,
        )
    except OSError as exc:
        stderr.close()
        raise _UpstreamError(f"cannot run {argv[0]}: {_os_reason(exc)}") from exc
    return ProcessStream(process, stderr, on_exit)


def _private_dir() -> str:
    path = tempfile.mkdtemp(prefix="bkdbg-bridge-")  # mode 0700
    if len(path) <= _MAX_UNIX_PATH:
        return path
    os.rmdir(path)
    return tempfile.mkdtemp(prefix="bkdbg-bridge-", dir="/tmp")


def _hint(address: Address) -> str:
    if address.scheme == "docker-container":
        return "check that the docker CLI is installed and the container runs buildkitd"
    return "start Docker, or pass --addr (scripts/local-buildkit.sh start runs a local one)"


def _os_reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _quiet_shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already disconnected
