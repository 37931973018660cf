"""The site's Flower config file (the top level of the repository is fixed, so name it with --conf).

    celery -A deephardway_site flower --conf=deephardway_site/flowerconfig.py

It gives Flower's Broker page and /api/queues/length our etcd queues (etcd_broker.flower):
messages waiting, unacknowledged, and live consumers per queue. Any Flower option may follow
(port = 5555, basic_auth = [...], ...: https://flower.readthedocs.io/en/latest/config.html).
"""
import etcd_broker.flower

etcd_broker.flower.install()
