#!/usr/bin/env bash
# Start a throwaway local PostgreSQL for manual work with kmsgate; print its SQLAlchemy URL.
#
#   scripts/dev-postgres.sh [start]   start (or reuse) the server; prints the URL on stdout
#   scripts/dev-postgres.sh url       print the URL of the running server
#   scripts/dev-postgres.sh status    exit 0 if it is running
#   scripts/dev-postgres.sh stop      stop it and delete all its data
#
#   export KMSGATE_DATABASE_URL=$(scripts/dev-postgres.sh)   # for example
#
# Superuser "postgres", trust authentication, listening on 127.0.0.1 only, fsync off: for
# development and tests, never for data you want to keep.
#
# Environment: KMSGATE_DEV_PG_DIR (default /tmp/kmsgate-dev-pg-<uid>),
#              KMSGATE_DEV_PG_PORT (default: a free port, remembered until `stop`).
# Needs Debian's postgresql package (/usr/lib/postgresql/<version>/bin). As root, the server
# runs as the `postgres` user (initdb refuses to run as root).
set -euo pipefail

BASE=${KMSGATE_DEV_PG_DIR:-/tmp/kmsgate-dev-pg-$(id -u)}
RUN="$BASE/pg"       # owned by the server's user: data/, socket, log
DATA="$RUN/data"
LOG="$RUN/postgres.log"
PORT_FILE="$BASE/port"

die() {
    printf 'dev-postgres: %s\n' "$*" >&2
    exit 1
}
info() { printf 'dev-postgres: %s\n' "$*" >&2; }

find_bindir() {
    local best="" v
    for v in $(ls /usr/lib/postgresql 2>/dev/null | sort -V); do
        [[ -x /usr/lib/postgresql/$v/bin/initdb && -x /usr/lib/postgresql/$v/bin/pg_ctl ]] &&
            best=/usr/lib/postgresql/$v/bin
    done
    [[ -n $best ]] || die "no /usr/lib/postgresql/*/bin/initdb: apt-get install postgresql"
    echo "$best"
}

as_server_user() { # as_server_user TIMEOUT CMD...: run bounded, as postgres when root
    local limit=$1
    shift
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user"
        (cd "$BASE" && timeout "$limit" su postgres -s /bin/sh -c "$(printf '%q ' "$@")")
    else
        (cd "$BASE" && timeout "$limit" "$@")
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        2>/dev/null || echo 55432
}

url() { echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$PORT_FILE")/postgres"; }

is_running() {
    [[ -f $DATA/PG_VERSION && -f $PORT_FILE ]] || return 1
    as_server_user 30 "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start() {
    if is_running; then
        info "already running (data in $BASE)"
        url
        return
    fi
    if [[ ! -f $DATA/PG_VERSION ]]; then
        rm -rf "$BASE"
        mkdir -p "$BASE"
        chmod 0711 "$BASE" # the server user must be able to traverse it
        mkdir -m 0700 "$RUN"
        ((EUID != 0)) || chown postgres:postgres "$RUN"
        info "initdb into $DATA"
        as_server_user 120 "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 \
            --locale=C.UTF-8 --no-sync >/dev/null ||
            die "initdb failed"
        echo "${KMSGATE_DEV_PG_PORT:-$(free_port)}" >"$PORT_FILE"
    fi
    local port
    port=$(cat "$PORT_FILE")
    info "starting on 127.0.0.1:$port (log: $LOG)"
    if ! as_server_user 90 "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
        -o "-p $port -k $RUN -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null; then
        tail -n 20 "$LOG" >&2 || true
        die "pg_ctl start failed (port $port taken? KMSGATE_DEV_PG_PORT=... or stop first)"
    fi
    url
}

stop() {
    if [[ -f $DATA/postmaster.pid ]]; then
        as_server_user 60 "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null ||
            as_server_user 60 "$BIN/pg_ctl" -D "$DATA" -m immediate -w -t 30 stop >/dev/null ||
            info "could not stop the server cleanly"
    fi
    rm -rf "$BASE"
    info "stopped; removed $BASE"
}

BIN=$(find_bindir)
case "${1:-start}" in
start) start ;;
stop) stop ;;
url) is_running || die "not running (start it with: $0 start)"; url ;;
status)
    if is_running; then
        info "running: $(url) (data in $BASE)"
    else
        info "not running"
        exit 1
    fi
    ;;
-h | --help | help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
*) die "unknown command '$1' (start|stop|status|url)" ;;
esac
