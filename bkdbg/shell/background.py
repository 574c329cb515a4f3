"""Background threads of the monitor: the completion cache and the server event watcher.

Completion makes no call to a server on a keystroke: server and process ids come from
`IdCache`, which a thread refreshes every few seconds and after each command.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from bkdbg.errors import BkdbgError

logger = logging.getLogger(__name__)

REFRESH_INTERVAL = 3.0  # seconds between refreshes of the completion cache

IdFetcher = Callable[[], list[str]]


class IdCache:
    """Server and process ids for completion, refreshed in the thread `bkdbg-completion`."""

    def __init__(
        self,
        fetch_servers: IdFetcher,
        fetch_processes: IdFetcher,
        interval: float = REFRESH_INTERVAL,
    ) -> None:
        self._fetchers = {"servers": fetch_servers, "processes": fetch_processes}
        self._values: dict[str, list[str]] = {"servers": [], "processes": []}
        self._errors: dict[str, str] = {}
        self._loaded = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="bkdbg-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def refresh_soon(self) -> None:
        """Ask the thread to refresh now instead of at the end of its interval."""
        self._wake.set()

    def servers(self) -> list[str]:
        return self._get("servers")

    def processes(self) -> list[str]:
        return self._get("processes")

    def error(self, kind: str) -> str | None:
        """Return why the last refresh of `kind` ("servers" or "processes") failed, if it did."""
        with self._lock:
            return self._errors.get(kind)

    def _get(self, kind: str) -> list[str]:
        with self._lock:
            return list(self._values[kind])

    def refresh(self) -> None:
        """Fetch every list once, in the calling thread."""
        for kind, fetch in self._fetchers.items():
            try:
                values, error = fetch(), None
            except BkdbgError as exc:
                values, error = [], str(exc)
                logger.debug("completion cache: cannot list %s: %s", kind, exc)
            except Exception as exc:
                # the client may be closed under this thread (exit, kill, switching
                # servers); completion then offers nothing instead of ending the thread
                values, error = [], f"{type(exc).__name__}: {exc}"
                logger.debug("completion cache: cannot list %s", kind, exc_info=True)
            with self._lock:
                self._values[kind] = values
                if error is None:
                    self._errors.pop(kind, None)
                else:
                    self._errors[kind] = error
        self._loaded.set()

    def _run(self) -> None:
        while not self._stopped:
            self.refresh()
            self._wake.wait(self._interval)
            self._wake.clear()


class ClosableStream(Protocol):
    """An iterable stream that another thread can end (`DaemonClient.events()`)."""

    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class EventWatcher:
    """Pass each server event to a callback, in the thread `bkdbg-events`.

    The stream ends when this client leaves the server, calls `stop()`, or loses the
    server. Only a lost server calls `on_lost`, with the reason.
    """

    def __init__(
        self,
        stream: ClosableStream,
        on_event: Callable[[Any], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._stream = stream
        self._on_event = on_event
        self._on_lost = on_lost
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="bkdbg-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the stream; the thread ends without reporting anything."""
        self._stopped = True
        self._stream.close()

    def _run(self) -> None:
        try:
            for event in self._stream:
                if self._stopped:
                    return
                self._on_event(event)
        except BkdbgError as exc:
            if not self._stopped:
                self._on_lost(str(exc))
        except Exception:
            # a stream closed under this thread (ValueError from a closed channel) is
            # expected after stop(); anything else is a bug, kept in the log
            if not self._stopped:
                raise


class Expected:
    """Server events that this client caused and has already shown, one entry per event.

    The monitor drops an event found here instead of showing it above the prompt.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, key: str) -> None:
        with self._lock:
            self._pending[(kind, key)] = self._pending.get((kind, key), 0) + 1

    def take(self, kind: str, key: str) -> bool:
        """Return True (and forget it) if one event (kind, key) was expected."""
        with self._lock:
            count = self._pending.get((kind, key), 0)
            if count == 0:
                return False
            if count == 1:
                del self._pending[(kind, key)]
            else:
                self._pending[(kind, key)] = count - 1
            return True
