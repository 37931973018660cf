"""A real fault for pool-health tests: a prefork child that hangs while it starts.

Load it into a worker with ``--include tests.hang_child_init``. While the file named by
HANG_CHILD_INIT_FILE exists, every new pool child blocks in ``worker_process_init`` (before
it tells billiard it is up), as a child did that waited on a lock inherited from its parent
(issue 18); billiard kills it after 4 s and starts another, which hangs too. POOL_CHECK_SECONDS
and POOL_GRACE_SECONDS shorten etcd_broker.pool_health's timing for the test.
"""
from __future__ import annotations

import os
import time

from celery import signals

#: The file whose existence makes new pool children hang.
HANG_VARIABLE = "HANG_CHILD_INIT_FILE"
#: How often a hanging child looks at the file again (seconds).
LOOK_SECONDS = 0.1


@signals.worker_init.connect
def _short_pool_checks(sender=None, **kwargs) -> None:
    for variable, setting in (("POOL_CHECK_SECONDS", "pool_health_check_seconds"),
                              ("POOL_GRACE_SECONDS", "pool_health_grace_seconds")):
        if os.environ.get(variable):
            sender.app.conf[setting] = float(os.environ[variable])


@signals.worker_process_init.connect
def _hang_while_asked(**kwargs) -> None:
    path = os.environ.get(HANG_VARIABLE)
    while path and os.path.exists(path):
        time.sleep(LOOK_SECONDS)
