"""Transport options are checked when the transport is made (transport/options.py), against a real etcd."""
from __future__ import annotations

import pytest
from kombu import Connection

from etcd_broker.exceptions import EtcdConfigError
from etcd_broker.transport.options import OPTIONS

#: One wrong value per option we define, and the words its error must carry.
WRONG = [
    ("idempotent_publish", "no", "expected a bool, got 'no'"),
    ("delayed_delivery", 1, "expected a bool, got 1"),
    ("max_message_bytes", -1, "expected an int >= 1, got -1"),
    ("max_message_bytes", "big", "expected an int >= 1, got 'big'"),
    ("lease_ttl", "10", "expected an int >= 1, got '10'"),
    ("lease_ttl", 0, "expected an int >= 1, got 0"),
    ("reconcile_seconds", True, "expected a number of seconds > 0, got True"),
    ("reconcile_seconds", 0, "expected a number of seconds > 0, got 0"),
    ("default_priority", 10, "expected an int from 0 to 9, got 10"),
    ("prefix", 5, "expected a str, got 5"),
    ("endpoints", "h2:2379", "expected a list of \"host:port\" strs, got 'h2:2379'"),
    ("user", 7, "expected a str, got 7"),
    ("timeout", "5", "expected a number of seconds > 0, got '5'"),
]


@pytest.mark.parametrize(("name", "value", "words"), WRONG, ids=[f"{n}={v!r}" for n, v, _ in WRONG])
def test_a_wrong_option_is_refused_by_name_at_connect(etcd_url, etcd_prefix, name, value, words):
    options = {"prefix": etcd_prefix, name: value}
    with Connection(etcd_url, transport_options=options) as conn:
        with pytest.raises(EtcdConfigError) as raised:
            conn.connect()
    assert str(raised.value) == f"transport option {name}: {words}"
    assert isinstance(raised.value, ValueError)


def test_every_option_we_define_has_a_wrong_case_here():
    assert {name for name, _, _ in WRONG} >= set(OPTIONS) - {"password", "ca_cert", "cert_key", "cert_cert"}


def test_kombu_and_celery_options_and_good_values_pass_untouched(etcd_url, etcd_prefix):
    options = {
        "prefix": etcd_prefix, "lease_ttl": 5, "reconcile_seconds": 2.5, "max_message_bytes": 100_000,
        "default_priority": 3, "delayed_delivery": False, "idempotent_publish": False, "endpoints": [],
        "timeout": 4, "user": None,
        # kombu's and Celery's own, and a name nobody defines: not ours to judge
        "visibility_timeout": "anything", "max_retries": 3, "interval_start": 0, "interval_step": 0.2,
        "polling_interval": 1, "fanout_prefix": True, "some_future_option": object(),
    }
    with Connection(etcd_url, transport_options=options) as conn:
        queue = conn.SimpleQueue("options-pass")
        queue.put({"n": 1})
        message = queue.get(timeout=10)
        message.ack()
        assert message.payload == {"n": 1}
        assert message.properties["priority"] == 3  # default_priority reached the channel
        channel = conn.default_channel
        assert (channel.max_message_bytes, channel.idempotent_publish, channel.delayed_delivery) == \
            (100_000, False, False)
        assert (conn.transport.lease_ttl, conn.transport.reconcile_seconds) == (5, 2.5)
        queue.close()
