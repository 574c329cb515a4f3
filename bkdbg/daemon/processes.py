"""A container process as the server keeps it: output fan-out, replay ring, input owner.

The newest attachment with input takes the process's stdin, and the one that had it gets
`TakenOver` and its stream ends. Read-only attachments only watch. Output goes to every
attachment's `SendQueue` without waiting for the client. While no attachment has the
input, it also goes into the replay ring, so that a user who comes back gets what the
process wrote meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bkdbg.daemon.backend import ProcessHandle
from bkdbg.daemon.buffers import RingBuffer, SendQueue
from bkdbg.daemon.messages import Attached, Closed, Exited, Output, ProcessInfo, TakenOver
from bkdbg.errors import BkdbgError

logger = logging.getLogger(__name__)

RUNNING = "running"
EXITED = "exited"
# BuildKit sends a process's last output after its exit status, so the exit is announced
# only once stdout and stderr reached EOF, or after this many seconds
EOF_WAIT = 2.0
_OUTPUT_FDS = frozenset({1, 2})
_attach_ids = itertools.count(1)


@dataclass(eq=False)
class Attachment:
    """One client's attach stream to one process."""

    client_id: str
    read_only: bool
    queue: SendQueue = field(init=False)
    id: int = field(default_factory=lambda: next(_attach_ids))

    def __post_init__(self) -> None:
        # The input owner must see every byte, because a piped `cat` is data, not a view.
        # So its queue is lossless, while watchers' queues drop and never hold the process.
        self.queue = SendQueue(lossless=not self.read_only)


class ManagedProcess:
    """A process in a debug container and the clients attached to it."""

    def __init__(
        self,
        process_id: str,
        args: list[str],
        tty: bool,
        on_exit: Callable[[ManagedProcess], None],
    ) -> None:
        self.id = process_id
        self.args = args
        self.tty = tty
        self.started = time.time()
        self.state = RUNNING
        self.exit_code = 0
        self.exit_message = ""
        self.replaced_by = ""
        self.ring = RingBuffer()
        self._on_exit = on_exit
        self._handle: ProcessHandle | None = None
        self._lock = threading.Lock()
        self._attachments: list[Attachment] = []
        self._owner: Attachment | None = None
        self._eof_fds: set[int] = set()
        self._all_eof = threading.Condition(self._lock)
        self._exited = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def bind(self, handle: ProcessHandle) -> None:
        """Take the started backend process and watch for its exit in a thread."""
        self._handle = handle
        watcher = threading.Thread(target=self._watch, name=f"process-{self.id}", daemon=True)
        watcher.start()

    def _watch(self) -> None:
        assert self._handle is not None
        try:
            code = self._handle.wait()
            message = _not_found_message(self.args) if self._handle.command_not_found else ""
        except BkdbgError as exc:
            code, message = 255, str(exc)
            logger.warning("process %s was lost: %s", self.id, exc)
        except Exception as exc:
            # a bug below us must still end the attach streams, or clients would hang
            code, message = 255, f"internal error: {exc}"
            logger.exception("waiting for process %s failed", self.id)
        with self._lock:
            self._all_eof.wait_for(lambda: _OUTPUT_FDS <= self._eof_fds, timeout=EOF_WAIT)
        self.finish(code, message)

    def finish(self, code: int, message: str = "") -> None:
        """Record the exit and tell every attached client; later calls do nothing."""
        with self._lock:
            if self.state == EXITED:
                return
            self.state, self.exit_code = EXITED, code
            self.exit_message = self.exit_message or message
            exited = Exited(code, self.exit_message, self.replaced_by)
            for attachment in self._attachments:
                attachment.queue.put(exited)
            self._attachments.clear()
            self._owner = None
        self._handle = None
        self._exited.set()
        logger.info("process %s exited with status %d%s", self.id, code,
                    f": {self.exit_message}" if self.exit_message else "")
        self._on_exit(self)

    def wait_exited(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)

    def set_exit_reason(self, message: str, replaced_by: str = "") -> None:
        """Say why the process is about to end (its container is being released)."""
        with self._lock:
            if self.state == RUNNING:
                self.exit_message = message
                self.replaced_by = replaced_by

    # ------------------------------------------------------------ output

    def sink(self, fd: int, data: bytes) -> None:
        """Take output from the backend; wait only while the input owner's queue is full."""
        with self._lock:
            if not data:
                self._eof_fds.add(fd)
                self._all_eof.notify_all()
                return
            if self._owner is None:
                self.ring.append(fd, data)
            chunk = Output(fd, data)
            for attachment in self._attachments:
                attachment.queue.put(chunk)
            owner = self._owner
        if owner is not None:
            # outside the lock: attach, detach and takeover must go on while this waits,
            # and detach aborts the queue, which ends the wait
            owner.queue.wait_for_room()

    # ------------------------------------------------------------ clients

    def attach(self, client_id: str, read_only: bool, replay: bool) -> Attachment:
        """Attach a client; with input, it takes over from the previous input owner."""
        attachment = Attachment(client_id, read_only)
        with self._lock:
            self._queue_start(attachment, replay)
            if self.state == EXITED:
                attachment.queue.put(Exited(self.exit_code, self.exit_message, self.replaced_by))
                return attachment
            if not read_only:
                self._take_input(attachment)
            self._attachments.append(attachment)
        logger.info(
            "client %s attached to process %s%s",
            client_id, self.id, " read-only" if read_only else "",
        )
        return attachment

    def _queue_start(self, attachment: Attachment, replay: bool) -> None:
        chunks = self.ring.snapshot() if replay else []
        replayed = sum(len(data) for _, data in chunks)
        attachment.queue.put(Attached(self.id, list(self.args), self.tty, replayed))
        for fd, data in chunks:
            attachment.queue.put(Output(fd, data))

    def _take_input(self, attachment: Attachment) -> None:
        # the new owner has seen (or declined) the kept output, so the ring starts over
        self.ring.clear()
        previous, self._owner = self._owner, attachment
        if previous is not None:
            previous.queue.put(TakenOver(attachment.client_id))
            self._attachments.remove(previous)
            logger.info(
                "client %s took process %s over from client %s",
                attachment.client_id, self.id, previous.client_id,
            )

    def detach(self, attachment: Attachment) -> None:
        """Remove an attachment (its stream ended); output is kept again if it had input."""
        with self._lock:
            attached = attachment in self._attachments
            if attached:
                self._attachments.remove(attachment)
            if self._owner is attachment:
                self._owner = None
        attachment.queue.abort()
        if attached:
            logger.info("client %s detached from process %s", attachment.client_id, self.id)

    def close_attachments(self, message: Closed) -> None:
        """End every attach stream with `message` (a disconnect or shutdown)."""
        with self._lock:
            attachments, self._attachments, self._owner = self._attachments, [], None
        for attachment in attachments:
            attachment.queue.put(message)

    def close_client(self, client_id: str, message: Closed) -> None:
        """End the attach streams of one client with `message` (a disconnect)."""
        with self._lock:
            ended = [a for a in self._attachments if a.client_id == client_id]
            self._attachments = [a for a in self._attachments if a.client_id != client_id]
            if self._owner in ended:
                self._owner = None
        for attachment in ended:
            attachment.queue.put(message)

    def owner_client(self) -> str:
        with self._lock:
            return self._owner.client_id if self._owner is not None else ""

    # ------------------------------------------------------------ input

    def write(self, attachment: Attachment, data: bytes) -> None:
        handle = self._input_handle(attachment, "stdin")
        if handle is not None:
            handle.write(data)

    def close_stdin(self, attachment: Attachment) -> None:
        handle = self._input_handle(attachment, "stdin EOF")
        if handle is not None:
            handle.close_stdin()

    def resize(self, attachment: Attachment, rows: int, cols: int) -> None:
        handle = self._input_handle(attachment, "resize")
        if handle is not None and self.tty and rows and cols:
            handle.resize(rows, cols)

    def signal(self, attachment: Attachment, name: str) -> None:
        handle = self._input_handle(attachment, f"signal {name}")
        if handle is not None:
            handle.signal(name)

    def _input_handle(self, attachment: Attachment, what: str) -> ProcessHandle | None:
        with self._lock:
            allowed = self._owner is attachment and self.state == RUNNING
        if not allowed:
            logger.debug(
                "dropped %s from client %s: it does not hold process %s's input",
                what, attachment.client_id, self.id,
            )
            return None
        return self._handle

    def info(self, current: bool) -> ProcessInfo:
        with self._lock:
            return ProcessInfo(
                id=self.id,
                args=list(self.args),
                state=self.state,
                exit_code=self.exit_code,
                tty=self.tty,
                current=current,
                attached_client=self._owner.client_id if self._owner else "",
            )


def _not_found_message(args: list[str]) -> str:
    command = args[0] if args else ""
    return (
        f"command not found in the image: {command}: "
        "check the name, or pass --invoke a command the image has"
    )
