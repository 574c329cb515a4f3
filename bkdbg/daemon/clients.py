"""The clients of a server: ids from `Hello`, open streams, and their event subscriptions.

A client counts as present while it has a stream open (Events, Attach or Build). This is
how the server notices a client that died or lost its terminal: the kernel closes the
client's socket, so gRPC ends its streams.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from bkdbg.daemon.messages import ClientInfo, ServerEvent

logger = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 256
# clients without an open stream that are remembered, because a killed client never sends
# Goodbye; the oldest are forgotten first
KEPT_IDLE_CLIENTS = 64


class EventSubscription:
    """Events waiting for one Events stream; a full queue drops new events, with a log line."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._queue: queue.Queue[ServerEvent | None] = queue.Queue(EVENT_QUEUE_SIZE)
        self.dropped = 0

    def put(self, event: ServerEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            logger.warning("dropped a %s event for client %s: it reads no events",
                           event.kind, self.client_id)

    def end(self) -> None:
        """Make `get` return None after the events already queued."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            # make room for the end marker, since no reader will take the dropped event
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    def get(self, timeout: float | None = None) -> ServerEvent | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass(eq=False)
class ClientRecord:
    """One client, from its Hello until its Goodbye."""

    id: str
    pid: int = 0
    name: str = ""
    streams: int = 0
    subscriptions: list[EventSubscription] = field(default_factory=list)


class ClientRegistry:
    """Every client of the server, with the bookkeeping for the idle timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, ClientRecord] = {}
        self._ids = itertools.count(1)
        self._last_activity = time.monotonic()
        self.had_client = False  # a client sent Hello at least once

    def register(self, pid: int, name: str) -> ClientRecord:
        with self._lock:
            record = ClientRecord(f"c{next(self._ids)}", pid, name)
            self._clients[record.id] = record
            self.had_client = True
            self._last_activity = time.monotonic()
            self._forget_idle()
        logger.info("client %s connected (pid %d, %s)", record.id, pid, name or "no name")
        return record

    def _forget_idle(self) -> None:
        idle = [r.id for r in self._clients.values() if r.streams == 0 and not r.subscriptions]
        for client_id in idle[: max(0, len(idle) - KEPT_IDLE_CLIENTS)]:
            del self._clients[client_id]

    def ensure(self, client_id: str) -> ClientRecord:
        """Return the client with this id; an empty or unknown id gets a record of its own."""
        with self._lock:
            record = self._clients.get(client_id)
            if record is None:
                record = ClientRecord(client_id or f"c{next(self._ids)}")
                self._clients[record.id] = record
            return record

    def touch(self) -> None:
        with self._lock:
            self._last_activity = time.monotonic()

    def stream_opened(self, client_id: str) -> None:
        with self._lock:
            self._record(client_id).streams += 1
            self._last_activity = time.monotonic()

    def stream_closed(self, client_id: str) -> None:
        with self._lock:
            record = self._record(client_id)
            record.streams = max(0, record.streams - 1)
            self._last_activity = time.monotonic()
            if record.streams == 0:
                logger.info("client %s has no stream open", client_id)

    def _record(self, client_id: str) -> ClientRecord:
        record = self._clients.get(client_id)
        if record is None:
            record = self._clients[client_id] = ClientRecord(client_id)
        return record

    def subscribe(self, client_id: str) -> EventSubscription:
        subscription = EventSubscription(client_id)
        with self._lock:
            self._record(client_id).subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: EventSubscription) -> None:
        with self._lock:
            record = self._clients.get(subscription.client_id)
            if record is not None and subscription in record.subscriptions:
                record.subscriptions.remove(subscription)

    def broadcast(self, event: ServerEvent, only: str | None = None) -> None:
        """Send `event` to every client's Events streams, or to client `only`'s."""
        with self._lock:
            targets = [
                subscription
                for record in self._clients.values()
                if only is None or record.id == only
                for subscription in record.subscriptions
            ]
        for subscription in targets:
            subscription.put(event)

    def end_events(self, client_id: str | None = None) -> None:
        """End the Events streams of one client, or of every client."""
        with self._lock:
            targets = [
                subscription
                for record in self._clients.values()
                if client_id is None or record.id == client_id
                for subscription in record.subscriptions
            ]
        for subscription in targets:
            subscription.end()

    def forget(self, client_id: str) -> None:
        with self._lock:
            self._clients.pop(client_id, None)
            self._last_activity = time.monotonic()
        logger.info("client %s sent Goodbye", client_id)

    def present(self, exclude: str = "") -> list[ClientRecord]:
        """Return the clients with a stream open, except `exclude`."""
        with self._lock:
            return [r for r in self._clients.values() if r.streams > 0 and r.id != exclude]

    def idle_seconds(self) -> float:
        """Return how long no client had a stream open and no request came; 0 when busy."""
        with self._lock:
            if any(record.streams > 0 for record in self._clients.values()):
                return 0.0
            return time.monotonic() - self._last_activity

    def infos(self, attached: dict[str, str]) -> list[ClientInfo]:
        """Describe the present clients; `attached` maps client ids to their process."""
        return [
            ClientInfo(record.id, record.pid, record.name, attached.get(record.id, ""))
            for record in self.present()
        ]
