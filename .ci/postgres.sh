# Start a private PostgreSQL server on 127.0.0.1 for the store tests; exports RLHF_TEST_POSTGRES_URL.
PG_DIR=${PG_DIR:-/tmp/rlhf-ci-pg}
PG_PORT=${PG_PORT:-55432}

start_test_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  rm -rf "$PG_DIR"
  mkdir -p "$PG_DIR"
  chown postgres "$PG_DIR" 2>/dev/null || true
  local as=()
  [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  "${as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U rlhf --auth=trust >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" \
    -l "$PG_DIR/log" -w start >/dev/null
  "${as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U rlhf rlhf_test
  export RLHF_TEST_POSTGRES_URL="postgresql+psycopg://rlhf@127.0.0.1:$PG_PORT/rlhf_test"
  export PG_BIN="$bin"
}

stop_test_postgres() {
  local as=()
  [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  [ -n "${PG_BIN:-}" ] && "${as[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
}
