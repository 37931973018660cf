"""Every etcd key the transport and the result backend use, built in one place.

Layout (``<root>`` is ``<prefix>/<vhost>``, names are percent-quoted so a ``/``
in a queue name cannot escape its directory)::

    <root>/declared/<queue>                         queue exists (JSON: auto_delete, owner lease)
    <root>/q/<queue>/ready/<band>/<seq>[~<ms>]      waiting message; band = 9 - priority;
                                                    ~<ms>: expires at this epoch millisecond (TTL)
    <root>/q/<queue>/unacked/<lease>/<band>/<seq>   claimed by the consumer holding <lease>
    <root>/q/<queue>/body/<seq>/<n>                 chunk n of a large expiring message's body
    <root>/q/<queue>/parked/<token>                 an idle consumer waits for a hand-off (its lease;
                                                    transport/handoff.py)
    <root>/q/<queue>/delayed/<due>/<band>/<seq>[~<ms>]  an ETA task waiting for its due time
                                                    (<due>: epoch ms, 13 digits; delayed.py)
    <root>/p/<queue>/<publish id>                   a publish was stored (short lease; idempotent.py)
    <root>/x/<exchange>                             exchange type
    <root>/b/<exchange>/<queue>/<routing key>       binding (JSON: routing_key, pattern, queue)
    <root>/consumer/<lease>                         live consumer (attached to its lease)
    <root>/dead/<queue>/<seq>                       undecodable messages
    <root>/ping, <root>/compaction-probe            never written: read or watched as probes
    <prefix>/results/<task id>                      task state (result backend)
    <prefix>/groups/<group id>                      saved GroupResult (result backend)
    <prefix>/chords/<group id>/size                 chord header size (result backend)
    <prefix>/chords/<group id>/parts/<task>.<index> one key per finished header task
    <prefix>/chords/<group id>/publisher            who publishes the callback (short lease)
    <prefix>/cancel/<task id>                       cooperative cancel marker

``<band>/<seq>`` sorts by urgency then age, so one ascending range read returns
the next message; a claimed message keeps its ``<band>/<seq>`` and goes back to
the same place in line when its consumer dies. A message with a TTL carries its
deadline in its key, so a consumer can drop it unread and a requeue keeps it.
"""
from __future__ import annotations

import os
import threading
import time
from urllib.parse import quote, unquote

DEFAULT_PREFIX = "/deephardway"
#: Priorities as AMQP means them: 9 is the most urgent.
MAX_PRIORITY = 9
#: Separates a message's sequence number from its expiry deadline in its key.
DEADLINE_MARK = "~"


def _q(name: str) -> str:
    return quote(name, safe="") or "%00"


def range_end(prefix: str) -> str:
    """etcd's range end for every key that starts with ``prefix`` (prefix ends in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Sequence:
    """Strictly increasing, zero-padded sequence numbers: wall-clock ns, unique per process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._suffix = f"{os.getpid() & 0xFFFF:04x}{id(self) & 0xFFFF:04x}"

    def next(self) -> str:
        with self._lock:
            now = max(time.time_ns(), self._last + 1)
            self._last = now
        return f"{now:020d}-{self._suffix}"


class KeySpace:
    """Key builder for one prefix and virtual host."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, vhost: str = "/") -> None:
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        vhost = (vhost or "/").strip("/") or "default"
        self.root = f"{self.prefix}/{_q(vhost)}"

    # queues ---------------------------------------------------------------
    def queue(self, queue: str) -> str:
        return f"{self.root}/q/{_q(queue)}/"

    def declared_queues(self) -> str:
        return f"{self.root}/declared/"

    def declared(self, queue: str) -> str:
        return f"{self.declared_queues()}{_q(queue)}"

    def queue_of_declared(self, key: str | bytes) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(self.declared_queues()):])

    def ready(self, queue: str) -> str:
        return f"{self.queue(queue)}ready/"

    def ready_band(self, queue: str, band: int) -> str:
        return f"{self.ready(queue)}{band}/"

    def ready_message(self, queue: str, position: str) -> str:
        """``position`` is ``<band>/<seq>``."""
        return f"{self.ready(queue)}{position}"

    def unacked(self, queue: str, lease: int | None = None) -> str:
        base = f"{self.queue(queue)}unacked/"
        return base if lease is None else f"{base}{lease:016x}/"

    def unacked_message(self, queue: str, lease: int, position: str) -> str:
        return f"{self.unacked(queue, lease)}{position}"

    def delayed(self, queue: str) -> str:
        return f"{self.queue(queue)}delayed/"

    def delayed_until(self, queue: str, due: float) -> str:
        """The range end of the delayed messages of ``queue`` due at or before epoch second ``due``."""
        return f"{self.delayed(queue)}{int(due * 1000) + 1:013d}"

    def delayed_message(self, queue: str, due: float, position: str) -> str:
        """``position`` is ``<band>/<seq>[~<ms>]``: it moves to ``ready/<position>`` when due."""
        return f"{self.delayed(queue)}{max(0, int(due * 1000)):013d}/{position}"

    @staticmethod
    def due_of(key: str | bytes) -> float:
        """The epoch second a delayed message key is due at."""
        key = key.decode() if isinstance(key, bytes) else key
        return int(key.rsplit("/", 3)[-3]) / 1000

    def body_chunks(self, queue: str, seq: str) -> str:
        """The chunks of one large message's body (large_body.py), under the message's TTL lease."""
        return f"{self.queue(queue)}body/{seq}/"

    def body_chunk(self, queue: str, seq: str, index: int) -> str:
        return f"{self.body_chunks(queue, seq)}{index:06d}"

    def parked(self, queue: str) -> str:
        """The consumers parked on ``queue``, waiting for a publisher's hand-off (transport/handoff.py)."""
        return f"{self.queue(queue)}parked/"

    def parked_consumer(self, queue: str, token: str) -> str:
        """One consumer's parked key on ``queue`` (``token``: the parking transport's, fixed for its life)."""
        return f"{self.parked(queue)}{token}"

    def published(self, queue: str, publish_id: str) -> str:
        """The marker of one stored publish to ``queue`` (transport/idempotent.py)."""
        return f"{self.root}/p/{_q(queue)}/{publish_id}"

    @staticmethod
    def band(priority: int) -> int:
        return MAX_PRIORITY - priority

    def position(self, priority: int, seq: str, deadline: float | None = None) -> str:
        """``<band>/<seq>``, plus ``~<epoch ms>`` when the message expires at ``deadline``."""
        mark = "" if deadline is None else f"{DEADLINE_MARK}{max(0, int(deadline * 1000)):013d}"
        return f"{self.band(priority)}/{seq}{mark}"

    @staticmethod
    def deadline_of(key: str | bytes) -> float | None:
        """The epoch second a message key says it expires at (None: no TTL)."""
        key = key.decode() if isinstance(key, bytes) else key
        _, mark, millis = key.rpartition("/")[2].partition(DEADLINE_MARK)
        return int(millis) / 1000 if mark else None

    @staticmethod
    def window_end(key: bytes, width: int) -> bytes:
        """The key ``width`` sequence units (ns of publish time) past ready key ``key``, in its band.

        A bounded head read is ``[key, window_end(key, width))``: the messages of that band
        published within ``width`` ns after ``key``'s (transport.py; sequences are wall-clock ns).
        """
        band, _, name = key.rpartition(b"/")
        return b"%s/%020d" % (band, int(name[:20]) + width)

    def position_of(self, key: str | bytes) -> str:
        """The trailing ``<band>/<seq>`` of a ready or unacked message key."""
        key = key.decode() if isinstance(key, bytes) else key
        return "/".join(key.rsplit("/", 2)[-2:])

    def queue_of(self, key: str | bytes) -> str:
        """The queue name in a ready or unacked message key."""
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(f"{self.root}/q/"):].split("/", 1)[0])

    def lease_of_unacked(self, key: str | bytes) -> int:
        key = key.decode() if isinstance(key, bytes) else key
        return int(key.split("/unacked/", 1)[1].split("/", 1)[0], 16)

    # exchanges and bindings ---------------------------------------------------
    def exchange(self, exchange: str) -> str:
        return f"{self.root}/x/{_q(exchange)}"

    def bindings(self, exchange: str) -> str:
        return f"{self.root}/b/{_q(exchange)}/"

    def binding(self, exchange: str, queue: str, routing_key: str) -> str:
        return f"{self.bindings(exchange)}{_q(queue)}/{_q(routing_key)}"

    def all_bindings(self) -> str:
        return f"{self.root}/b/"

    def exchange_of_binding(self, key: str | bytes) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(self.all_bindings()):].split("/", 1)[0])

    # consumers and dead letters ------------------------------------------------
    def consumers(self) -> str:
        return f"{self.root}/consumer/"

    def consumer(self, lease: int) -> str:
        return f"{self.consumers()}{lease:016x}"

    @staticmethod
    def lease_of_consumer(key: str | bytes) -> int:
        """The lease id of a ``consumer/<lease hex>`` key."""
        key = key.decode() if isinstance(key, bytes) else key
        return int(key.rsplit("/", 1)[1], 16)

    def dead(self, queue: str) -> str:
        return f"{self.root}/dead/{_q(queue)}/"

    def dead_message(self, queue: str, seq: str) -> str:
        """Where an undecodable message of ``queue`` is moved (its own sequence number)."""
        return f"{self.dead(queue)}{seq}"

    # probes ----------------------------------------------------------------------
    def ping(self) -> str:
        """A key never written: reading it proves etcd answers (Transport.establish_connection)."""
        return f"{self.root}/ping"

    def compaction_probe(self) -> str:
        """A key never written, under the deployment's prefix (a user's role may be limited to it):
        core/maintenance.py watches it from revision 1 to learn the last compaction."""
        return f"{self.root}/compaction-probe"

    # results -------------------------------------------------------------------
    def results(self) -> str:
        return f"{self.prefix}/results/"

    def result(self, task_id: str) -> str:
        return f"{self.results()}{_q(task_id)}"

    def task_id_of_result(self, key: str | bytes) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(self.results()):])

    def group_result(self, group_id: str) -> str:
        return f"{self.prefix}/groups/{_q(group_id)}"

    def chord(self, group_id: str) -> str:
        """Everything one chord counts with (deleted in one range delete when it completes)."""
        return f"{self.prefix}/chords/{_q(group_id)}/"

    def chord_size(self, group_id: str) -> str:
        return f"{self.chord(group_id)}size"

    def chord_parts(self, group_id: str) -> str:
        return f"{self.chord(group_id)}parts/"

    def chord_part(self, group_id: str, part: str) -> str:
        return f"{self.chord_parts(group_id)}{_q(part)}"

    def chord_publisher(self, group_id: str) -> str:
        return f"{self.chord(group_id)}publisher"

    def cancel(self, task_id: str) -> str:
        return f"{self.prefix}/cancel/{_q(task_id)}"
