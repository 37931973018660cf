"""Benchmarks: each prints a table with our etcd path and its comparison measured in the same run."""
