"""The etcd core that the transport and the result backend share.

A map, bottom up (each module imports only those above it):

- :mod:`~etcd_broker.core.ops`: every etcd key (``KeySpace``), priority bands, ``Sequence``.
- :mod:`~etcd_broker.core.client`: fork safety (the gRPC channel gate, after-fork handlers),
  ``PerProcess`` (the one per-process registry), ``ChildLock``.
- :mod:`~etcd_broker.core.client`: the client factory (URL, failover, auth, TLS) and errors by gRPC status.
- :mod:`~etcd_broker.core.ops`: the one way to call etcd: transactions, reads, lease grants.
- :mod:`~etcd_broker.core.ops`: the one lease pool (keys that expire together share a lease).
- :mod:`~etcd_broker.core.watch`: one watch stream per process and cluster, shared by subscriptions.
- :mod:`~etcd_broker.core.ops`: concurrent threads' transactions sent as one.
- :mod:`~etcd_broker.core.maintenance`: an operator's view of the cluster (DB size, compaction, defrag).
"""
