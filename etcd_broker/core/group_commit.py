"""Group commit: transactions from concurrent threads of one process share one etcd transaction.

Every etcd write is a Raft proposal and a disk sync; 64 threads each publishing a message or
storing a result make 64 proposals. Here a thread whose transaction arrives while another is in
flight waits; when that one returns, one waiting thread runs every waiting transaction as one
(compares ANDed, success ops concatenated) and hands each caller its own part of the response.
Each caller still returns only once etcd has committed its own writes. A lone caller runs its
transaction at once, as before. If the combined compares fail, or etcd refuses the combined
request (a lost lease, too large), each caller runs its own transaction alone, so no caller's
outcome depends on another's; a connection error reaches every caller of the batch, as it would
have reached each of them alone (the writes may or may not have been applied).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import grpc
from etcd3 import etcdrpc

from etcd_broker.core import forking, ops
from etcd_broker.core.client import CONNECTION_ERRORS

logger = logging.getLogger(__name__)

MAX_TXN_OPS, MAX_TXN_BYTES = ops.MAX_TXN_OPS, ops.MAX_TXN_BYTES  # etcd's limits, one place (ops.py)


class _Pending:
    """One caller's transaction and, once run, its outcome."""

    __slots__ = ("compare", "success", "failure", "size", "response", "error", "alone", "done")

    def __init__(self, compare: list, success: list, failure: list) -> None:
        self.compare, self.success, self.failure = compare, success, failure
        self.size = sum(op.ByteSize() for op in success)
        self.response: Any = None
        self.error: BaseException | None = None
        self.alone = False
        self.done = False


class GroupCommit:
    """Runs :func:`ops.txn` for many threads, sharing transactions while one is in flight."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._queue: list[_Pending] = []
        self._busy = False
        self._cond = threading.Condition()

    def txn(self, compare: Iterable[etcdrpc.Compare] = (), success: Iterable[etcdrpc.RequestOp] = (),
            failure: Iterable[etcdrpc.RequestOp] = ()) -> etcdrpc.TxnResponse:
        """As :func:`ops.txn`, returning once this transaction's writes are committed (or refused)."""
        return self.txn_many([(compare, success, failure)])[0]

    def txn_many(self, transactions: Iterable[tuple[Iterable, Iterable, Iterable]]) -> list[etcdrpc.TxnResponse]:
        """Several ``(compare, success, failure)`` transactions of one caller, sharing etcd
        transactions with each other and with other threads'; their responses, in order."""
        mine = [_Pending(list(compare), list(success), list(failure)) for compare, success, failure in transactions]
        with self._cond:
            self._queue.extend(mine)
            while not all(pending.done for pending in mine):
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy, batch = True, self._take()
                self._cond.release()
                try:
                    self._run(batch)
                except BaseException as exc:  # never leave a caller of the batch waiting
                    self._finish([p for p in batch if not p.done], error=exc)
                    raise
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        for pending in mine:
            if pending.error is not None:
                raise pending.error
        return [ops.txn(self.client, p.compare, p.success, p.failure) if p.alone else p.response for p in mine]

    def _take(self) -> list[_Pending]:
        """The oldest waiting transactions that fit in one etcd transaction."""
        batch: list[_Pending] = []
        compares = successes = size = 0
        for pending in self._queue:
            compares += len(pending.compare)
            successes += len(pending.success)
            size += pending.size
            if batch and (compares > MAX_TXN_OPS or successes > MAX_TXN_OPS or size > MAX_TXN_BYTES):
                break
            batch.append(pending)
        del self._queue[:len(batch)]
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:  # nobody to share with: exactly the caller's own transaction
            pending = batch[0]
            try:
                pending.response = ops.txn(self.client, pending.compare, pending.success, pending.failure)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                pending.error = exc
            pending.done = True
            return
        try:
            response = ops.txn(self.client, [c for p in batch for c in p.compare],
                               [op for p in batch for op in p.success])
        except CONNECTION_ERRORS as exc:
            self._finish(batch, error=exc)
            return
        except (grpc.RpcError, ops.LeaseNotFound) as exc:  # refused as a whole: each runs alone
            logger.debug("shared transaction of %d refused (%s); each runs alone", len(batch), exc)
            self._finish(batch, alone=True)
            return
        except Exception as exc:  # noqa: BLE001 - re-raised in every caller's thread
            self._finish(batch, error=exc)
            return
        if not response.succeeded:
            self._finish(batch, alone=True)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.success)
            pending.response = etcdrpc.TxnResponse(header=response.header, succeeded=True,
                                                   responses=response.responses[start:end])
            pending.done, start = True, end

    @staticmethod
    def _finish(batch: list[_Pending], *, error: BaseException | None = None, alone: bool = False) -> None:
        for pending in batch:
            pending.error, pending.alone, pending.done = error, alone, True


_shared = forking.PerProcess()


def shared(client: Any) -> GroupCommit:
    """This process's :class:`GroupCommit` for ``client`` (publishes and result writes share it)."""
    return _shared.get((id(client),), lambda: GroupCommit(client), usable=lambda committer: committer.client is client)
