"""The session's backend on the real BuildKit: `bkdbg.gateway` behind the `backend` protocols."""

from __future__ import annotations

import logging

from bkdbg.daemon.backend import STATE_RESULT, OutputSink, ProcessSpec, ProgressSink, Terminal
from bkdbg.errors import ContainerError, FailedStep
from bkdbg.gateway.address import TLSOptions
from bkdbg.gateway.build import BuildResult, GatewayBuild
from bkdbg.gateway.connection import Connection, connect
from bkdbg.gateway.container import ProcessConfig
from bkdbg.gateway.debug_container import DebugContainer, DebugProcess
from bkdbg.gateway.invoke import process_config
from bkdbg.options import BuildOptions, InvokeConfig, TLSConfig

logger = logging.getLogger(__name__)


class GatewayBackend:
    """Opens each build with `bkdbg.gateway.connect` and `GatewayBuild`."""

    def start_build(self, options: BuildOptions, on_progress: ProgressSink) -> GatewayBuildHandle:
        conn = connect(options.addr, _tls_options(options.tls))
        logger.info("connected to BuildKit at %s", conn.address)
        try:
            return GatewayBuildHandle(conn, GatewayBuild(conn, options, on_progress))
        except BaseException:
            conn.close()
            raise


def _tls_options(tls: TLSConfig | None) -> TLSOptions | None:
    if tls is None:
        return None
    return TLSOptions(ca=tls.ca, cert=tls.cert, key=tls.key, server_name=tls.server_name)


class GatewayBuildHandle:
    """One `GatewayBuild` and its connection, with containers on its result or failed step."""

    def __init__(self, conn: Connection, build: GatewayBuild) -> None:
        self.address = conn.address
        self._conn = conn
        self._build = build
        self._result: BuildResult | None = None
        self._failed_step: FailedStep | None = None

    def solve(self) -> None:
        from bkdbg.errors import BuildFailed

        try:
            self._result = self._build.solve()
        except BuildFailed as exc:
            self._failed_step = exc.step
            raise

    def export(self) -> list[str]:
        return self._build.export()

    def can_debug_failure(self) -> bool:
        return self._build.failed_exec is not None

    def new_container(self, state: str) -> GatewayContainer:
        result = self._result
        if state == STATE_RESULT and result is None:
            raise ContainerError("no build result to debug: the build did not succeed")
        image_config = result.image_config if result is not None else None
        ref_id = result.ref_id if result is not None else None
        debug = DebugContainer(
            self._build, state, image_config, ref_id=ref_id, dial=self._conn.h2_dialer
        )
        return GatewayContainer(debug)

    def process_spec(self, invoke: InvokeConfig, state: str, terminal: Terminal) -> ProcessSpec:
        if state == STATE_RESULT:
            image_config = self._result.image_config if self._result else None
            failed_step = None
        else:
            image_config, failed_step = None, self._failed_step
        config = process_config(invoke, image_config, failed_step, invoke.tty,
                                terminal.rows, terminal.cols, terminal.term or None)
        return ProcessSpec(args=list(config.args), tty=config.tty, env=list(config.env),
                           user=config.user, cwd=config.cwd, rows=config.rows,
                           cols=config.cols, native=config)

    def cancel(self) -> None:
        self._build.cancel()

    def close(self) -> None:
        try:
            self._build.close()
        finally:
            self._conn.close()


class GatewayContainer:
    """A `DebugContainer` whose processes take a `ProcessSpec`."""

    def __init__(self, container: DebugContainer) -> None:
        self._container = container

    def run(self, spec: ProcessSpec, sink: OutputSink) -> DebugProcess:
        assert isinstance(spec.native, ProcessConfig)
        return self._container.run(spec.native, sink)

    def release(self) -> None:
        self._container.release()

