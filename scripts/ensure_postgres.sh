#!/usr/bin/env bash
# Make sure the PostgreSQL server the tests use (127.0.0.1:5432) is up; start the local cluster if not.
set -euo pipefail
host=${OPENLORA_TEST_PG_HOST:-127.0.0.1}
port=${OPENLORA_TEST_PG_PORT:-5432}

up() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

up && exit 0
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "==> starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do
    up && exit 0
    sleep 1
  done
fi
echo "error: PostgreSQL is not reachable on $host:$port and could not be started here." >&2
echo "       Start a server with trust auth there, or set OPENLORA_TEST_PG_ADMIN_URL." >&2
exit 1
