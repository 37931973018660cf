"""The etcd core that the transport and the result backend share.

A map, bottom up (each module imports only those above it):

- :mod:`~etcd_broker.core.client`: this process's etcd client (URL, failover, auth, TLS), errors by
  gRPC status; fork safety (the gRPC channel gate, after-fork handlers), ``PerProcess`` (the one
  per-process registry), ``ChildLock``.
- :mod:`~etcd_broker.core.ops`: every etcd key (``KeySpace``) and the one way to call etcd:
  transactions, reads, leases; group commit; the one lease pool.
- :mod:`~etcd_broker.core.watch`: one watch stream per process and cluster, shared by subscriptions.
- :mod:`~etcd_broker.core.maintenance`: an operator's view of the cluster (DB size, compaction, defrag).
"""
