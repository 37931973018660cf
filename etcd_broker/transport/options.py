"""The transport options this transport defines, in one table, and their check.

:func:`check_options` runs when kombu makes the :class:`~etcd_broker.transport.channel.Transport`
(a connection's first use), before anything reads an option: a wrong type or value raises
:class:`~etcd_broker.exceptions.EtcdConfigError` (a ``ValueError``) naming the option, the
value given and what is allowed. Options kombu and Celery define themselves
(``visibility_timeout``, ``max_retries``, ``interval_start``, ``polling_interval``...) are not
ours to judge: names outside :data:`OPTIONS` pass untouched. docs/transport.md lists the table.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from etcd_broker.core.ops import MAX_PRIORITY
from etcd_broker.exceptions import EtcdConfigError

#: Priorities as AMQP means them: kombu clamps a message's priority to this range.
PRIORITY_RANGE = (0, MAX_PRIORITY)


@dataclass(frozen=True)
class Option:
    """One transport option: what a value must be, in a test and in words."""

    accepts: Callable[[Any], bool]
    #: What is allowed, for the error message ("an int >= 1").
    allowed: str
    #: None is also accepted (the default applies).
    optional: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(least: int) -> Option:
    return Option(lambda v: _is_int(v) and v >= least, f"an int >= {least}")


def _positive_seconds() -> Option:
    return Option(lambda v: _is_number(v) and v > 0, "a number of seconds > 0")


def _text(optional: bool = False) -> Option:
    return Option(lambda v: isinstance(v, str), "a str", optional)


def _endpoints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) and item for item in value)


#: Every option this transport reads (channel.py, core/client.py's ETCD_OPTIONS), by name.
OPTIONS: dict[str, Option] = {
    "prefix": _text(),
    "lease_ttl": _int_at_least(1),
    "reconcile_seconds": _positive_seconds(),
    "max_message_bytes": _int_at_least(1),
    "default_priority": Option(lambda v: _is_int(v) and PRIORITY_RANGE[0] <= v <= PRIORITY_RANGE[1],
                               f"an int from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}"),
    "delayed_delivery": Option(lambda v: isinstance(v, bool), "a bool"),
    "idempotent_publish": Option(lambda v: isinstance(v, bool), "a bool"),
    "endpoints": Option(_endpoints, 'a list of "host:port" strs'),
    "user": _text(optional=True),
    "password": _text(optional=True),
    "ca_cert": _text(optional=True),
    "cert_key": _text(optional=True),
    "cert_cert": _text(optional=True),
    "timeout": _positive_seconds(),
}


def check_options(options: Mapping[str, Any]) -> None:
    """Raise EtcdConfigError for the first of our options in ``options`` whose value is not allowed."""
    for name, option in OPTIONS.items():
        if name not in options:
            continue
        value = options[name]
        if value is None and option.optional:
            continue
        if not option.accepts(value):
            raise EtcdConfigError(f"transport option {name}: expected {option.allowed}, got {value!r}")
