"""Fault tests: real etcd servers and workers, faults injected, every execution counted."""
import pytest

# counting.py holds assertions shared by the fault tests: pytest explains them only if it rewrites them.
pytest.register_assert_rewrite("tests.reliability.counting")
