"""SSH agent forwarding for `RUN --mount=type=ssh` (service moby.sshforward.v1.SSH).

Each `--ssh ID=PATH` names one agent socket, or private key files that a private
`ssh-agent` (started for the session) holds. BuildKit calls `CheckAgent(ID)` first,
then opens one `ForwardAgent` stream per connection a build step makes, naming the
agent in the metadata key `buildkit.ssh.id` (empty means `default`).

Like BuildKit's own provider (sshprovider/agentprovider.go), the forwarded agent is
read-only: requests that add, remove or lock keys, and extensions, get the reply
SSH_AGENT_FAILURE and never reach the agent. Listing keys and signing pass through.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat as statmod
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bkdbg.buildkit_proto import sshforward_pb2
from bkdbg.errors import UsageError
from bkdbg.gateway.filesync import decode_metadata
from bkdbg.options import SSHSpec

logger = logging.getLogger(__name__)

DEFAULT_ID = "default"
KEY_SSH_ID = "buildkit.ssh.id"

# SSH agent protocol (draft-miller-ssh-agent): requests passed through to the agent
AGENT_REQUEST_IDENTITIES = 11
AGENT_SIGN_REQUEST = 13
AGENT_UNLOCK = 23
ALLOWED_REQUESTS = frozenset({AGENT_REQUEST_IDENTITIES, AGENT_SIGN_REQUEST, AGENT_UNLOCK})
AGENT_FAILURE_FRAME = b"\x00\x00\x00\x01\x05"  # SSH_AGENT_FAILURE
MAX_AGENT_MESSAGE = 256 * 1024  # OpenSSH's agent limit on one message
AGENT_TIMEOUT = 10.0  # seconds for ssh-agent to start and ssh-add to load the keys
DIAL_TIMEOUT = 2.0  # seconds, as BuildKit dials agent sockets


@dataclass
class Agent:
    """One forwardable agent: a socket, maybe served by our own ssh-agent process."""

    socket_path: str
    process: subprocess.Popen[bytes] | None = None
    temp_dir: str | None = None

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(AGENT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def agent_for(spec: SSHSpec) -> Agent:
    """Return the agent for one --ssh value; raise UsageError for unusable paths."""
    paths = spec.paths or [os.environ.get("SSH_AUTH_SOCK", "")]
    sockets: list[str] = []
    keys: list[str] = []
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise UsageError(
                f"invalid --ssh value: {spec.id}: {path or 'SSH_AUTH_SOCK'}: "
                f"{exc.strerror or exc}: give an agent socket or a private key file"
            ) from exc
        (sockets if statmod.S_ISSOCK(mode) else keys).append(path)
    if sockets and (keys or len(sockets) > 1):
        raise UsageError(f"invalid --ssh value: {spec.id}: give one agent socket or only key files")
    if sockets:
        return Agent(sockets[0])
    return start_key_agent(spec.id, keys)


def start_key_agent(ssh_id: str, keys: Sequence[str]) -> Agent:
    """Start a private ssh-agent holding `keys` (BuildKit keeps keys in memory instead)."""
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        raise UsageError(
            f"invalid --ssh value: {ssh_id}: key files need ssh-agent and ssh-add: "
            "install OpenSSH's client or pass an agent socket"
        )
    temp_dir = tempfile.mkdtemp(prefix="bkdbg-ssh-")
    agent = Agent(os.path.join(temp_dir, "agent.sock"), temp_dir=temp_dir)
    agent.process = subprocess.Popen(
        ["ssh-agent", "-D", "-a", agent.socket_path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_socket(agent.socket_path)
        _add_keys(ssh_id, agent.socket_path, keys)
    except BaseException:
        agent.close()
        raise
    return agent


def _wait_for_socket(path: str) -> None:
    deadline = time.monotonic() + AGENT_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise UsageError(f"ssh-agent did not start: no socket at {path}: check ssh-agent")
        time.sleep(0.01)


def _add_keys(ssh_id: str, socket_path: str, keys: Sequence[str]) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DISPLAY"}
    env.update(SSH_AUTH_SOCK=socket_path, SSH_ASKPASS_REQUIRE="never")
    for key in keys:
        # a new session has no terminal, so ssh-add cannot ask for a passphrase
        result = subprocess.run(
            ["ssh-add", "-q", key],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=AGENT_TIMEOUT,
            start_new_session=True,
            check=False,
        )
        if result.returncode != 0:
            reason = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise UsageError(
                f"invalid --ssh value: {ssh_id}: failed to load key {key}: "
                f"{reason[-1] if reason else 'ssh-add failed'}: keys with a passphrase "
                "need an agent socket"
            )


@dataclass
class SSHService:
    """Forwards SSH agents to build steps."""

    specs: Sequence[SSHSpec]
    agents: dict[str, Agent] = field(default_factory=dict)

    SERVICE = "moby.sshforward.v1.SSH"
    METHODS = ("/moby.sshforward.v1.SSH/CheckAgent", "/moby.sshforward.v1.SSH/ForwardAgent")

    def start(self) -> None:
        """Check every --ssh value and start agents for key files."""
        for spec in self.specs:
            ssh_id = spec.id or DEFAULT_ID
            if ssh_id in self.agents:
                raise UsageError(f"invalid --ssh value: {ssh_id}: the id is given twice")
            self.agents[ssh_id] = agent_for(spec)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.agents.clear()

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "CheckAgent": grpc.unary_unary_rpc_method_handler(
                self.check_agent,
                request_deserializer=sshforward_pb2.CheckAgentRequest.FromString,
                response_serializer=sshforward_pb2.CheckAgentResponse.SerializeToString,
            ),
            "ForwardAgent": grpc.stream_stream_rpc_method_handler(
                self.forward_agent,
                request_deserializer=sshforward_pb2.BytesMessage.FromString,
                response_serializer=sshforward_pb2.BytesMessage.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(self.SERVICE, methods)

    def check_agent(
        self, request: sshforward_pb2.CheckAgentRequest, context: grpc.ServicerContext
    ) -> sshforward_pb2.CheckAgentResponse:
        self._agent(request.ID or DEFAULT_ID, context)
        return sshforward_pb2.CheckAgentResponse()

    def forward_agent(
        self, request_iterator: Iterator[sshforward_pb2.BytesMessage], context: grpc.ServicerContext
    ) -> Iterator[sshforward_pb2.BytesMessage]:
        ids = decode_metadata(context.invocation_metadata()).get(KEY_SSH_ID) or [""]
        ssh_id = ids[0] or DEFAULT_ID
        agent = self._agent(ssh_id, context)
        try:
            conn = _dial(agent.socket_path)
        except OSError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"failed to dial agent {ssh_id}: {exc}")
        logger.info("forwarding ssh agent %r", ssh_id)
        return _forward(ssh_id, conn, request_iterator, context)

    def _agent(self, ssh_id: str, context: grpc.ServicerContext) -> Agent:
        agent = self.agents.get(ssh_id)
        if agent is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"ssh agent not forwarded: {ssh_id}: pass --ssh {ssh_id}=PATH",
            )
        assert agent is not None
        return agent


def _dial(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(DIAL_TIMEOUT)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        raise
    conn.settimeout(None)
    return conn


def _forward(
    ssh_id: str,
    conn: socket.socket,
    requests: Iterator[sshforward_pb2.BytesMessage],
    context: grpc.ServicerContext,
) -> Iterator[sshforward_pb2.BytesMessage]:
    try:
        yield from _proxy(conn, requests)
    except (OSError, ValueError) as exc:
        logger.warning("ssh agent %r forwarding failed: %s", ssh_id, exc)
        context.abort(grpc.StatusCode.UNKNOWN, f"ssh agent {ssh_id} forwarding failed: {exc}")


def _proxy(
    conn: socket.socket, requests: Iterator[sshforward_pb2.BytesMessage]
) -> Iterator[sshforward_pb2.BytesMessage]:
    """Pass agent requests one at a time, and reply to forbidden ones with a failure."""
    buffer = bytearray()
    try:
        for message in requests:
            buffer += message.data
            while (frame := _take_frame(buffer)) is not None:
                yield sshforward_pb2.BytesMessage(data=_reply(conn, frame))
    finally:
        conn.close()


def _take_frame(buffer: bytearray) -> bytes | None:
    """Remove and return one complete agent message (length prefix included)."""
    if len(buffer) < 4:
        return None
    (length,) = struct.unpack(">I", buffer[:4])
    if length == 0 or length > MAX_AGENT_MESSAGE:
        raise ValueError(f"invalid ssh agent message length {length}")
    if len(buffer) < 4 + length:
        return None
    frame = bytes(buffer[: 4 + length])
    del buffer[: 4 + length]
    return frame


def _reply(conn: socket.socket, frame: bytes) -> bytes:
    if frame[4] not in ALLOWED_REQUESTS:
        logger.info("rejected ssh agent request type %d: forwarding is read-only", frame[4])
        return AGENT_FAILURE_FRAME
    conn.sendall(frame)
    header = _read_exactly(conn, 4)
    (length,) = struct.unpack(">I", header)
    if length > MAX_AGENT_MESSAGE:
        raise ValueError(f"invalid ssh agent reply length {length}")
    return header + _read_exactly(conn, length)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the ssh agent closed the connection")
        data += chunk
    return bytes(data)
