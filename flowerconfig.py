"""Flower's config file (Flower reads ./flowerconfig.py, or the file given with --conf).

    celery -A deephardway_site flower           # from the repository root: this file is read

It gives Flower's Broker page and /api/queues/length our etcd queues (etcd_broker.flower):
messages waiting, unacknowledged, and live consumers per queue. Any Flower option may follow
(port = 5555, basic_auth = [...], ...: https://flower.readthedocs.io/en/latest/config.html).
"""
import etcd_broker.flower

etcd_broker.flower.install()
