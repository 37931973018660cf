"""consumer.py's table: which claimed message a SUCCESS write may delete, and what the ack then writes."""
from __future__ import annotations

import uuid

from etcd_broker.transport.consumer import hold_for_result, release_held, settled_by_result, take_for_result

CLIENT, OTHER_CLIENT = object(), object()


def held(key: str = "q/celery/unacked/1/5/0001") -> str:
    task_id = uuid.uuid4().hex
    hold_for_result(task_id, key, CLIENT, lambda k: k.replace("/1/", "/2/"))
    return task_id


def test_a_success_write_on_the_same_client_takes_the_current_key_and_the_ack_writes_nothing():
    task_id = held()
    assert take_for_result(task_id, CLIENT) == "q/celery/unacked/2/5/0001"  # moved by a lease adopt
    settled_by_result(task_id)
    assert take_for_result(task_id, CLIENT) is None  # deleted once; never again
    assert release_held(task_id, "q/celery/unacked/1/5/0001") is True


def test_a_message_not_deleted_by_its_success_write_is_acked_as_usual():
    task_id = held()
    assert take_for_result(task_id, CLIENT) is not None  # the write ran but found the key gone: no settled()
    assert release_held(task_id, "q/celery/unacked/1/5/0001") is False


def test_a_result_store_on_another_etcd_client_cannot_delete_the_message():
    task_id = held()
    assert take_for_result(task_id, OTHER_CLIENT) is None
    assert release_held(task_id, "q/celery/unacked/1/5/0001") is False


def test_an_ack_of_an_earlier_delivery_of_the_same_task_leaves_the_newer_one_held():
    task_id = held("q/celery/unacked/1/5/0001")
    hold_for_result(task_id, "q/celery/unacked/1/5/0002", CLIENT, lambda k: k)  # redelivered (a retry)
    assert release_held(task_id, "q/celery/unacked/1/5/0001") is False
    assert take_for_result(task_id, CLIENT) == "q/celery/unacked/1/5/0002"


def test_an_acked_message_is_forgotten():
    task_id = held()
    release_held(task_id, "q/celery/unacked/1/5/0001")
    assert take_for_result(task_id, CLIENT) is None
