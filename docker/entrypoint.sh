#!/bin/sh
# deephardway container entrypoint: one image, the role is the first argument.
#   web                 gunicorn serving the site and API on $PORT (default 8000)
#   worker [args...]    celery worker for model tasks (queues $WORKER_QUEUES, default gpu)
#   watch_jobs          follows task states in etcd and records them on Jobs
#   manage <cmd> ...    any manage.py command (migrate, train_models, queues, ...)
#   healthcheck         what the image's HEALTHCHECK runs (depends on the role started)
set -eu

ROLE_FILE=/tmp/deephardway-role
role="${1:-web}"
[ "$#" -gt 0 ] && shift

case "$role" in
  web)
    echo web > "$ROLE_FILE"
    # gthread: every open job event stream (SSE) holds one thread, not one process (docs/api.md).
    exec gunicorn deephardway_site.wsgi:application \
      --bind "0.0.0.0:${PORT:-8000}" \
      --workers "${WEB_WORKERS:-2}" --threads "${WEB_THREADS:-200}" --worker-class gthread \
      --timeout 0 --graceful-timeout 30 --access-logfile - "$@" ;;
  worker)
    echo worker > "$ROLE_FILE"
    # -P threads: one process per GPU keeps one copy of each model; batching needs concurrent callers.
    exec celery -A deephardway_site worker -l "${LOG_LEVEL:-INFO}" \
      -Q "${WORKER_QUEUES:-gpu}" -P threads -c "${WORKER_CONCURRENCY:-64}" \
      -n "worker@%h" --without-gossip --without-mingle "$@" ;;
  watch_jobs)
    echo watch_jobs > "$ROLE_FILE"
    exec python manage.py watch_jobs "$@" ;;
  manage)
    exec python manage.py "$@" ;;
  healthcheck)
    if [ "$(cat "$ROLE_FILE" 2>/dev/null || echo none)" = web ]; then
      # A page through gunicorn and Django, as the proxy sends it (docker/healthcheck.py).
      exec python /app/docker/healthcheck.py
    fi
    # Workers and watch_jobs ride out etcd outages by themselves (docs/reliability.md): a health check
    # that asked etcd would get them all restarted for nothing. Check the installation and settings only.
    exec python manage.py check ;;
  *)
    echo "unknown role '$role': use web, worker, watch_jobs, manage <command> or healthcheck" >&2
    exit 64 ;;
esac
