"""Tests for GatewayBuild, its frontend options and its outputs.

The integration tests build against the real local BuildKit (`buildkit_addr`) and read
results back with `LLBBridge.ReadFile` while the build is open.
"""

import http.client
import io
import json
import logging
import tarfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.buildkit_proto import gateway_pb2, ops_pb2
from bkdbg.errors import BuildCancelled, BuildFailed, UsageError
from bkdbg.gateway.build import GatewayBuild
from bkdbg.gateway.connection import Connection, connect
from bkdbg.gateway.container import Container, ProcessConfig
from bkdbg.gateway.export import NO_OUTPUT_NOTE, export_outputs, plan_exports
from bkdbg.gateway.frontend import frontend_setup, shared_key
from bkdbg.options import BuildOptions, InvokeConfig, OutputSpec, SecretSpec, parse_output
from bkdbg.progress import LogEvent, PlainRenderer, ProgressEvent, RawJSONRenderer
from tests.helpers import TEST_IMAGE
from tests.helpers.buildkit import UnixHTTPConnection, engine_get, runc_list, socket_path

CANCEL_LIMIT = 5.0  # seconds from cancel() to solve() raising
GONE_TIMEOUT = 10.0  # seconds for a cancelled RUN's container to go away

SIMPLE = f"""\
FROM {TEST_IMAGE}
COPY hello /hello
WORKDIR /app
ENV MODE=test
RUN echo built > /built
CMD ["sh", "-c", "cat /built"]
"""


@pytest.fixture
def conn(buildkit_addr: str) -> Iterator[Connection]:
    connection = connect(buildkit_addr)
    try:
        yield connection
    finally:
        connection.close()


class Recorder:
    """Collects progress events from the Status thread."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[ProgressEvent]) -> None:
        with self.lock:
            self.events.extend(events)

    def output(self) -> bytes:
        with self.lock:
            return b"".join(e.data for e in self.events if isinstance(e, LogEvent))


def read_file(build: GatewayBuild, ref: str, path: str) -> bytes:
    request = gateway_pb2.ReadFileRequest(Ref=ref, FilePath=path)
    response = build.bridge.ReadFile(request, metadata=build.call_metadata, timeout=10)
    return bytes(response.Data)


def run_in_state(build: GatewayBuild, result_id: str | None, args: list[str]) -> tuple[int, bytes]:
    """Run `args` in a container whose root is `result_id`; return exit status and stdout."""
    mount = ops_pb2.Mount(dest="/", mountType=ops_pb2.BIND, resultID=result_id or "")
    container = Container.create(build, [mount])
    output = bytearray()

    def sink(fd: int, data: bytes) -> None:
        if fd == 1:
            output.extend(data)

    try:
        process = container.start(ProcessConfig(args=args, env=[], fds=(1, 2)), sink)
        status = process.wait(30)
    finally:
        container.release()
    return status, bytes(output)


# --- frontend options (no BuildKit) ---------------------------------------------------


def test_frontend_options_from_build_options(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile.dev").write_text("FROM scratch\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    options = BuildOptions(
        context=str(tmp_path),
        dockerfile=str(tmp_path / "Dockerfile.dev"),
        target="base",
        build_args={"A": "1"},
        labels={"org.example": "x"},
        platforms=["linux/amd64", "linux/arm64"],
        no_cache=True,
        build_contexts={
            "extra": str(extra),
            "img": "docker-image://alpine:3",
            "context": str(extra),
        },
        network="none",
        add_hosts=["db:10.0.0.5", "gw=host-gateway"],
    )

    setup = frontend_setup(options, docker_engine=True, host_gateway_ip="172.17.0.1")

    assert setup.attrs == {
        "filename": "Dockerfile.dev",
        "target": "base",
        "build-arg:A": "1",
        "label:org.example": "x",
        "platform": "linux/amd64,linux/arm64",
        "no-cache": "",
        "context:extra": "local:extra",
        "sharedkey:localdir:extra": shared_key(str(extra)),
        "context:img": "docker-image://alpine:3",
        "context:context": "local:_context",
        "sharedkey:localdir:context": shared_key(str(extra)),
        "force-network-mode": "none",
        "add-hosts": "db=10.0.0.5,gw=172.17.0.1",
        "image-resolve-mode": "local",
    }
    assert setup.local_dirs == {
        "context": str(tmp_path),
        "dockerfile": str(tmp_path),
        "extra": str(extra),
        "_context": str(extra),
    }
    assert setup.shared_key == shared_key(str(tmp_path))
    assert setup.entitlements == []


def test_frontend_host_network_entitlement(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")

    setup = frontend_setup(BuildOptions(context=str(tmp_path), network="host"))

    assert setup.attrs["force-network-mode"] == "host"
    assert setup.entitlements == ["network.host"]


def test_frontend_stdin_dockerfile_temp_dir(tmp_path: Path) -> None:
    options = BuildOptions(context=str(tmp_path), dockerfile_content="FROM scratch\n")

    setup = frontend_setup(options)
    served = Path(setup.local_dirs["dockerfile"])
    content = (served / "Dockerfile").read_text()
    setup.cleanup()

    assert content == "FROM scratch\n"
    assert setup.attrs["filename"] == "Dockerfile"
    assert not served.exists()


def test_frontend_lowercase_dockerfile(tmp_path: Path) -> None:
    (tmp_path / "dockerfile").write_text("FROM scratch\n")

    setup = frontend_setup(BuildOptions(context=str(tmp_path)))

    assert setup.attrs["filename"] == "dockerfile"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BuildOptions(context="/nonexistent/ctx"), "build context not found: /nonexistent/ctx: "),
        (BuildOptions(context="/"), "Dockerfile not found: /Dockerfile: "),
        (BuildOptions(context="/", dockerfile_content="x", network="bridge"), "--network"),
        (BuildOptions(context="/", dockerfile_content="x", add_hosts=["nohost"]), "--add-host"),
        (BuildOptions(context="/", dockerfile_content="x", add_hosts=["h:1.2.3"]), "not an IP"),
        (
            BuildOptions(context="/", dockerfile_content="x", add_hosts=["h:host-gateway"]),
            "no host-gateway address",
        ),
        (
            BuildOptions(context="/", dockerfile_content="x", build_contexts={"a": "/nope"}),
            "build context 'a' not found: /nope",
        ),
    ],
)
def test_frontend_rejects_bad_input(options: BuildOptions, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("-", r"\-")):
        frontend_setup(options)


# --- output plans (no BuildKit) -------------------------------------------------------


def test_plan_tags_on_engine_load_image() -> None:
    plan = plan_exports(BuildOptions(context="/", tags=["a:1", "b:2"]), moby=True)

    assert [(e.Type, dict(e.Attrs)) for e in plan.exporters] == [("moby", {"name": "a:1,b:2"})]


def test_plan_push_on_engine_uses_engine() -> None:
    options = BuildOptions(context="/", outputs=[parse_output("type=image,name=r/x:1,push=true")])

    plan = plan_exports(options, moby=True)

    assert [(e.Type, dict(e.Attrs)) for e in plan.exporters] == [("moby", {"name": "r/x:1"})]
    assert plan.engine_pushes == ["r/x:1"]


def test_plan_image_on_buildkitd_pushes_itself() -> None:
    options = BuildOptions(context="/", outputs=[OutputSpec("registry", {})], tags=["r/x:1"])

    plan = plan_exports(options, moby=False)

    assert [(e.Type, dict(e.Attrs)) for e in plan.exporters] == [
        ("image", {"name": "r/x:1", "push": "true"})
    ]
    assert plan.engine_pushes == []


def test_plan_tar_to_stdout_stream() -> None:
    stdout = io.BytesIO()
    options = BuildOptions(context="/", outputs=[parse_output("-")])

    plan = plan_exports(options, moby=True, stdout=stdout)

    assert [e.Type for e in plan.exporters] == ["tar"]
    assert plan.targets[0].stream is stdout
    assert plan.targets[0].index == 0


def test_no_output_note_unless_invoke() -> None:
    options = BuildOptions(context="/")
    invoked = BuildOptions(context="/", invoke=InvokeConfig())

    # with nothing to export, BuildKit is not contacted, so no connection is needed
    assert export_outputs(None, options, print) == [NO_OUTPUT_NOTE]  # type: ignore[arg-type]
    assert export_outputs(None, invoked, print) == []  # type: ignore[arg-type]


# --- builds against BuildKit ---------------------------------------------------------


def test_simple_build_result(conn: Connection, make_context) -> None:
    context = make_context(SIMPLE, {"hello": "hello from context\n"})
    build = GatewayBuild(conn, BuildOptions(context=str(context)), Recorder())
    try:
        result = build.solve()
        built = read_file(build, result.ref_id, "/built")
        hello = read_file(build, result.ref_id, "/hello")
    finally:
        build.close()

    assert result.ref_id
    assert built == b"built\n"
    assert hello == b"hello from context\n"
    config = result.image_config["config"]
    assert config["Cmd"] == ["sh", "-c", "cat /built"]
    assert config["WorkingDir"] == "/app"
    assert "MODE=test" in config["Env"]
    assert b"containerimage.config" in [key.encode() for key in result.metadata]


def test_target_and_build_arg(conn: Connection, make_context) -> None:
    dockerfile = f"""\
FROM {TEST_IMAGE} AS base
ARG GREETING=unset
RUN echo "$GREETING" > /greeting
FROM base AS second
RUN echo second > /second
"""
    context = make_context(dockerfile)
    options = BuildOptions(context=str(context), target="base", build_args={"GREETING": "hi"})
    build = GatewayBuild(conn, options, Recorder())
    try:
        result = build.solve()
        greeting = read_file(build, result.ref_id, "/greeting")
        with pytest.raises(Exception, match="no such file"):
            read_file(build, result.ref_id, "/second")
    finally:
        build.close()

    assert greeting == b"hi\n"


def test_secret_mount_value_not_in_progress(conn: Connection, make_context, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"tok-{uuid.uuid4().hex}"
    dockerfile = f"FROM {TEST_IMAGE}\nRUN --mount=type=secret,id=tok cat /run/secrets/tok > /x\n"
    context = make_context(dockerfile)
    plain, raw = io.StringIO(), io.StringIO()
    renderers = [PlainRenderer(plain), RawJSONRenderer(raw)]

    def render(events: list[ProgressEvent]) -> None:
        for renderer in renderers:
            renderer.update(events)

    # BuildKit leaves secrets out of cache keys, so a cached step would keep an older value
    options = BuildOptions(
        context=str(context),
        secrets=[SecretSpec(id="tok", env="TOK", value=secret)],
        no_cache=True,
    )
    build = GatewayBuild(conn, options, render)
    try:
        result = build.solve()
        stored = read_file(build, result.ref_id, "/x")
    finally:
        build.close()
        for renderer in renderers:
            renderer.close(True)

    assert stored == secret.encode()
    assert "RUN --mount=type=secret,id=tok" in plain.getvalue()
    assert secret not in plain.getvalue()
    assert secret not in raw.getvalue()
    assert secret not in caplog.text


def test_failing_run_details(conn: Connection, make_context) -> None:
    dockerfile = f"""\
FROM {TEST_IMAGE}
WORKDIR /work
ENV FOO=bar
RUN --mount=type=cache,target=/cache echo partial > /partial && echo "failing now" && exit 7
RUN echo never
"""
    context = make_context(dockerfile)
    build = GatewayBuild(conn, BuildOptions(context=str(context)), Recorder())
    try:
        with pytest.raises(BuildFailed) as caught:
            build.solve()
        failure = build.failed_exec
    finally:
        build.close()

    step = caught.value.step
    assert step is not None
    assert str(caught.value).startswith(f"build step failed: {context}/Dockerfile:4 RUN ")
    assert step.line == 4
    assert step.exit_code == 7
    assert step.is_exec
    assert step.filename == f"{context}/Dockerfile"
    assert step.cwd == "/work"
    assert "FOO=bar" in step.env
    assert step.logs == ["failing now"]
    assert any(line.startswith("   4 | >>> RUN") for line in step.source_lines)
    assert failure is not None
    assert [m.dest for m in failure.exec_op.mounts] == ["/", "/cache"]
    assert len(failure.mount_ids) == 2
    assert len(failure.input_ids) == 2
    assert failure.mount_ids[0]
    assert failure.input_ids[0]
    # a cache mount has no result id, because a container finds it by its cache id
    assert failure.mount_ids[1] is None
    assert failure.exec_op.mounts[1].cacheOpt.ID


def test_failed_build_stays_open_until_close(conn: Connection, make_context) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo partial > /partial && exit 3\n")
    build = GatewayBuild(conn, BuildOptions(context=str(context)), Recorder())
    try:
        with pytest.raises(BuildFailed):
            build.solve()
        assert build.failed_exec is not None
        after = run_in_state(build, build.failed_exec.mount_ids[0], ["cat", "/partial"])
        before = run_in_state(build, build.failed_exec.input_ids[0], ["cat", "/partial"])
    finally:
        build.close()

    assert after == (0, b"partial\n")
    assert before[0] == 1


@pytest.mark.parametrize(
    ("dockerfile", "options", "message"),
    [
        (f"FROM {TEST_IMAGE}\nRUNN x\n", {}, "invalid Dockerfile: {context}/Dockerfile:2: "),
        (
            f"FROM {TEST_IMAGE} AS one\nFROM one AS two\n",
            {"target": "three"},
            "unknown build target: three: use one of one, two",
        ),
        (
            f"FROM {TEST_IMAGE}\nCOPY missing.txt /\n",
            {},
            'build step failed: {context}/Dockerfile:2 COPY missing.txt /: "/missing.txt" '
            "not found",
        ),
    ],
)
def test_build_error_messages(conn, make_context, dockerfile, options, message) -> None:
    context = make_context(dockerfile)
    build = GatewayBuild(conn, BuildOptions(context=str(context), **options), Recorder())
    try:
        with pytest.raises(BuildFailed) as caught:
            build.solve()
    finally:
        build.close()

    assert str(caught.value).startswith(message.format(context=context))
    assert build.failed_exec is None


def test_local_and_tar_outputs_match(conn: Connection, make_context, tmp_path: Path) -> None:
    context = make_context(SIMPLE, {"hello": "hello from context\n"})
    local_dir, tar_file = tmp_path / "out", tmp_path / "out.tar"
    outputs = [
        parse_output(f"type=local,dest={local_dir}"),
        parse_output(f"type=tar,dest={tar_file}"),
    ]
    options = BuildOptions(context=str(context), outputs=outputs)

    notes = export_outputs(conn, options, Recorder())

    assert notes == [
        f"exported the result to {local_dir}",
        f"wrote the result as a tar archive to {tar_file}",
    ]
    assert (local_dir / "built").read_text() == "built\n"
    assert (local_dir / "hello").read_text() == "hello from context\n"
    with tarfile.open(tar_file) as archive:
        names = {m.name.lstrip("./") for m in archive.getmembers()}
        for name in ("built", "hello", "bin/busybox"):
            member = archive.extractfile(name)
            assert member is not None
            assert member.read() == (local_dir / name).read_bytes()
    local_names = {str(p.relative_to(local_dir)) for p in local_dir.rglob("*")}
    assert names - {""} == local_names


def _image_tags(addr: str, name: str) -> list[str]:
    filters = urllib.parse.quote(json.dumps({"reference": [name]}))
    status, body = engine_get(socket_path(addr), f"/images/json?filters={filters}")
    assert status == 200
    return [tag for image in json.loads(body) for tag in image.get("RepoTags") or []]


def _delete_image(addr: str, name: str) -> None:
    conn = UnixHTTPConnection(socket_path(addr), timeout=10)
    try:
        conn.request("DELETE", f"/images/{urllib.parse.quote(name, safe='')}?force=1")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()


def test_tag_lands_in_engine(conn: Connection, make_context, buildkit_addr: str) -> None:
    name = f"bkdbg-test/tagged-{uuid.uuid4().hex[:8]}:latest"
    context = make_context(SIMPLE, {"hello": "hi\n"})
    try:
        notes = export_outputs(conn, BuildOptions(context=str(context), tags=[name]), Recorder())
        tags = _image_tags(buildkit_addr, name)
    finally:
        _delete_image(buildkit_addr, name)

    assert tags == [name]
    assert len(notes) == 1
    assert notes[0].startswith(f"loaded image {name} into the Docker Engine (sha256:")


def _containers_with(token: str) -> set[str]:
    """Return ids of the engine's build containers whose init command line has `token`."""
    found = set()
    for entry in runc_list():
        try:
            cmdline = Path(f"/proc/{entry['pid']}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.add(entry["id"])
    return found


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_cancel_during_long_run(conn: Connection, make_context) -> None:
    token = f"sleeper-{uuid.uuid4().hex[:8]}"
    # the trailing echo keeps sh from exec-ing sleep, so the init command line keeps the token
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo {token} && sleep 30 && echo {token}\n")
    recorder = Recorder()
    build = GatewayBuild(conn, BuildOptions(context=str(context), no_cache=True), recorder)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            build.solve()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert _wait_for(lambda: token.encode() in recorder.output(), 30)
        running = _containers_with(token)
        started = time.monotonic()
        build.cancel()
        thread.join(CANCEL_LIMIT)
        elapsed = time.monotonic() - started
    finally:
        build.close()
        thread.join(CANCEL_LIMIT)

    assert running, "the RUN step's container was not found while it ran"
    assert not thread.is_alive()
    assert elapsed < CANCEL_LIMIT
    assert len(outcome) == 1
    assert isinstance(outcome[0], BuildCancelled)
    assert _wait_for(lambda: not _containers_with(token), GONE_TIMEOUT)


def test_stdin_dockerfile_and_build_contexts(conn: Connection, make_context, tmp_path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "e.txt").write_text("from extra\n")
    dockerfile = f"""\
FROM {TEST_IMAGE}
COPY --from=extra e.txt /e.txt
COPY --from=img /bin/busybox /copied-busybox
RUN cat /etc/hosts > /hosts && ifconfig -a > /net
"""
    context = make_context("FROM scratch\n")  # the Dockerfile in the context is not used
    options = BuildOptions(
        context=str(context),
        dockerfile_content=dockerfile,
        build_contexts={"extra": str(extra), "img": f"docker-image://{TEST_IMAGE}"},
        network="none",
        add_hosts=["db:10.1.2.3"],
    )
    build = GatewayBuild(conn, options, Recorder())
    try:
        result = build.solve()
        copied = read_file(build, result.ref_id, "/e.txt")
        hosts = read_file(build, result.ref_id, "/hosts").decode()
        net = read_file(build, result.ref_id, "/net").decode()
        busybox = read_file(build, result.ref_id, "/copied-busybox")
    finally:
        build.close()

    assert copied == b"from extra\n"
    assert "10.1.2.3\tdb" in hosts.splitlines()
    assert net.count("inet addr:") == 1  # only the loopback interface under --network none
    assert len(busybox) > 100_000


def test_multi_platform_picks_first_requested(conn: Connection, make_context) -> None:
    context = make_context("FROM scratch\nCOPY hello /hello\n", {"hello": "hi\n"})
    options = BuildOptions(context=str(context), platforms=["linux/amd64", "linux/386"])
    build = GatewayBuild(conn, options, Recorder())
    try:
        result = build.solve()
    finally:
        build.close()

    assert result.image_config["architecture"] == "amd64"
    assert result.result.WhichOneof("result") == "refs"
    assert result.ref_id == result.result.refs.refs["linux/amd64"].id
