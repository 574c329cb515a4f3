from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("client_version", "client_pid", "client_name")
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    client_version: str
    client_pid: int
    client_name: str
    def __init__(self, client_version: _Optional[str] = ..., client_pid: _Optional[int] = ..., client_name: _Optional[str] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("server_version", "instance_id", "server_pid", "client_id")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    instance_id: str
    server_pid: int
    client_id: str
    def __init__(self, server_version: _Optional[str] = ..., instance_id: _Optional[str] = ..., server_pid: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("instance_id", "pid", "started_unix", "build_state", "clients", "context", "current_process", "buildkit_address", "version", "last_exit_code", "client_details")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    BUILD_STATE_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PROCESS_FIELD_NUMBER: _ClassVar[int]
    BUILDKIT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DETAILS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    pid: int
    started_unix: float
    build_state: str
    clients: _containers.RepeatedScalarFieldContainer[str]
    context: str
    current_process: str
    buildkit_address: str
    version: str
    last_exit_code: int
    client_details: _containers.RepeatedCompositeFieldContainer[ClientInfo]
    def __init__(self, instance_id: _Optional[str] = ..., pid: _Optional[int] = ..., started_unix: _Optional[float] = ..., build_state: _Optional[str] = ..., clients: _Optional[_Iterable[str]] = ..., context: _Optional[str] = ..., current_process: _Optional[str] = ..., buildkit_address: _Optional[str] = ..., version: _Optional[str] = ..., last_exit_code: _Optional[int] = ..., client_details: _Optional[_Iterable[_Union[ClientInfo, _Mapping]]] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("id", "pid", "name", "attached_process")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_PROCESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    name: str
    attached_process: str
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., name: _Optional[str] = ..., attached_process: _Optional[str] = ...) -> None: ...

class Terminal(_message.Message):
    __slots__ = ("term", "rows", "cols")
    TERM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    term: str
    rows: int
    cols: int
    def __init__(self, term: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class BuildRequest(_message.Message):
    __slots__ = ("options_json", "client_id", "terminal")
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    options_json: str
    client_id: str
    terminal: Terminal
    def __init__(self, options_json: _Optional[str] = ..., client_id: _Optional[str] = ..., terminal: _Optional[_Union[Terminal, _Mapping]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("client_id", "terminal")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    terminal: Terminal
    def __init__(self, client_id: _Optional[str] = ..., terminal: _Optional[_Union[Terminal, _Mapping]] = ...) -> None: ...

class BuildEvent(_message.Message):
    __slots__ = ("progress_json", "done")
    PROGRESS_JSON_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress_json: str
    done: BuildDone
    def __init__(self, progress_json: _Optional[str] = ..., done: _Optional[_Union[BuildDone, _Mapping]] = ...) -> None: ...

class BuildDone(_message.Message):
    __slots__ = ("ok", "error", "failed_step_json", "process_id", "notes", "error_kind")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEP_JSON_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    failed_step_json: str
    process_id: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    error_kind: str
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., failed_step_json: _Optional[str] = ..., process_id: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., error_kind: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("init", "client_id", "terminal")
    INIT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    init: bool
    client_id: str
    terminal: Terminal
    def __init__(self, init: _Optional[bool] = ..., client_id: _Optional[str] = ..., terminal: _Optional[_Union[Terminal, _Mapping]] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("process_id",)
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    process_id: str
    def __init__(self, process_id: _Optional[str] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("args", "env", "user", "cwd", "tty", "client_id", "terminal")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    user: str
    cwd: str
    tty: bool
    client_id: str
    terminal: Terminal
    def __init__(self, args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., user: _Optional[str] = ..., cwd: _Optional[str] = ..., tty: _Optional[bool] = ..., client_id: _Optional[str] = ..., terminal: _Optional[_Union[Terminal, _Mapping]] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("process_id",)
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    process_id: str
    def __init__(self, process_id: _Optional[str] = ...) -> None: ...

class AttachStart(_message.Message):
    __slots__ = ("process_id", "client_id", "tty", "rows", "cols", "read_only", "replay")
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    process_id: str
    client_id: str
    tty: bool
    rows: int
    cols: int
    read_only: bool
    replay: bool
    def __init__(self, process_id: _Optional[str] = ..., client_id: _Optional[str] = ..., tty: _Optional[bool] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., read_only: _Optional[bool] = ..., replay: _Optional[bool] = ...) -> None: ...

class Resize(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class AttachInput(_message.Message):
    __slots__ = ("start", "stdin", "stdin_eof", "resize", "signal")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_EOF_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    start: AttachStart
    stdin: bytes
    stdin_eof: bool
    resize: Resize
    signal: str
    def __init__(self, start: _Optional[_Union[AttachStart, _Mapping]] = ..., stdin: _Optional[bytes] = ..., stdin_eof: _Optional[bool] = ..., resize: _Optional[_Union[Resize, _Mapping]] = ..., signal: _Optional[str] = ...) -> None: ...

class Attached(_message.Message):
    __slots__ = ("process_id", "args", "tty", "replayed_bytes")
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_BYTES_FIELD_NUMBER: _ClassVar[int]
    process_id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    replayed_bytes: int
    def __init__(self, process_id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., tty: _Optional[bool] = ..., replayed_bytes: _Optional[int] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("fd", "data", "dropped_bytes")
    FD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    fd: int
    data: bytes
    dropped_bytes: int
    def __init__(self, fd: _Optional[int] = ..., data: _Optional[bytes] = ..., dropped_bytes: _Optional[int] = ...) -> None: ...

class ProcessExited(_message.Message):
    __slots__ = ("code", "message", "replaced_by")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    replaced_by: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., replaced_by: _Optional[str] = ...) -> None: ...

class TakenOver(_message.Message):
    __slots__ = ("by_client",)
    BY_CLIENT_FIELD_NUMBER: _ClassVar[int]
    by_client: str
    def __init__(self, by_client: _Optional[str] = ...) -> None: ...

class AttachOutput(_message.Message):
    __slots__ = ("attached", "data", "exited", "taken_over", "closed")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    TAKEN_OVER_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    attached: Attached
    data: Output
    exited: ProcessExited
    taken_over: TakenOver
    closed: str
    def __init__(self, attached: _Optional[_Union[Attached, _Mapping]] = ..., data: _Optional[_Union[Output, _Mapping]] = ..., exited: _Optional[_Union[ProcessExited, _Mapping]] = ..., taken_over: _Optional[_Union[TakenOver, _Mapping]] = ..., closed: _Optional[str] = ...) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("id", "args", "state", "exit_code", "tty", "current", "attached_client")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_CLIENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    state: str
    exit_code: int
    tty: bool
    current: bool
    attached_client: str
    def __init__(self, id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., exit_code: _Optional[int] = ..., tty: _Optional[bool] = ..., current: _Optional[bool] = ..., attached_client: _Optional[str] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "message", "process_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    process_id: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., process_id: _Optional[str] = ...) -> None: ...

class DisconnectRequest(_message.Message):
    __slots__ = ("client_id", "requester_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    requester_id: str
    def __init__(self, client_id: _Optional[str] = ..., requester_id: _Optional[str] = ...) -> None: ...

class DisconnectResponse(_message.Message):
    __slots__ = ("disconnected",)
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    disconnected: int
    def __init__(self, disconnected: _Optional[int] = ...) -> None: ...

class GoodbyeRequest(_message.Message):
    __slots__ = ("client_id", "end_session")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    end_session: bool
    def __init__(self, client_id: _Optional[str] = ..., end_session: _Optional[bool] = ...) -> None: ...

class GoodbyeResponse(_message.Message):
    __slots__ = ("shutting_down",)
    SHUTTING_DOWN_FIELD_NUMBER: _ClassVar[int]
    shutting_down: bool
    def __init__(self, shutting_down: _Optional[bool] = ...) -> None: ...

class CancelBuildRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class CancelBuildResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
