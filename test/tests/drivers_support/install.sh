#!/usr/bin/env bash
# Installs the real drivers the driver matrix (test/tests/drivers.rs) runs,
# idempotently: a Python venv with asyncpg, SQLAlchemy 2 and psycopg 3, the
# npm packages pg 8 (node-postgres) and postgres 4 (postgres.js; majors pinned:
# a new major reached CI unannounced once), and Debian's
# pgjdbc (libpostgresql-jdbc-java, /usr/share/java/postgresql.jar). Java 17,
# node/npm and python3-venv come with the machine (tools/setup).
# Called by tools/test and by the suite itself; a second run only checks.
set -euo pipefail
VENV="${NEXTGRES_DRIVERS_VENV:-/var/tmp/nextgres-drivers-venv}"
NPM_DIR="${NEXTGRES_DRIVERS_NPM:-/var/tmp/nextgres-drivers-npm}"
JAR=/usr/share/java/postgresql.jar

exec 9>>/var/tmp/nextgres-drivers.lock
flock 9

if ! "$VENV/bin/python" -c 'import asyncpg, psycopg, sqlalchemy, greenlet' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check --quiet \
    asyncpg 'psycopg[binary]' 'sqlalchemy[asyncio]>=2'
fi
if [ ! -f "$NPM_DIR/node_modules/pg/package.json" ] || [ ! -f "$NPM_DIR/node_modules/postgres/package.json" ]; then
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/package.json" ] || echo '{"name":"nextgres-drivers","private":true}' > "$NPM_DIR/package.json"
  npm install --prefix "$NPM_DIR" --no-audit --no-fund --silent pg@8 postgres@4
fi
if [ ! -f "$JAR" ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libpostgresql-jdbc-java >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libpostgresql-jdbc-java >/dev/null; }
  else
    echo "install.sh: $JAR missing and not root (apt-get install libpostgresql-jdbc-java)" >&2
    exit 1
  fi
fi
echo "drivers ready: $VENV, $NPM_DIR, $JAR"
