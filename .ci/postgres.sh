#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the tests and print its URL.
# Usage: eval "$(bash .ci/postgres.sh)"   (sets AUTOML_CXR_TEST_POSTGRES)
set -euo pipefail
# A free loopback port (a server left running by an earlier run must not break this one).
PORT=${PGPORT_TEST:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$BIN" ]; then
  echo "postgres.sh: PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 1
fi
DIR=$(mktemp -d /tmp/automl-cxr-pg.XXXXXX)
RUN_AS=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$DIR"
  RUN_AS=(runuser -u postgres --)
fi
"${RUN_AS[@]}" "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >"$DIR/initdb.log" 2>&1
"${RUN_AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >&2
"$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres automl_cxr_test
echo "export AUTOML_CXR_TEST_POSTGRES=postgresql+psycopg2://postgres@127.0.0.1:$PORT/automl_cxr_test"
echo "export AUTOML_CXR_TEST_POSTGRES_DIR=$DIR"
