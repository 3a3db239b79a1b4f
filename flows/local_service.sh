#!/usr/bin/env bash
# Start or stop a local Prefect service for crackjax: server, work pool, deployments, worker.
#
#   flows/local_service.sh serve    start the server and a process worker, deploy prefect.yaml
#   flows/local_service.sh deploy   deploy prefect.yaml to the running server again
#   flows/local_service.sh stop     stop the worker, then the server
#
# Settings (environment): PREFECT_BIN (default .venv/bin/prefect), PREFECT_PORT (4200),
# PREFECT_POOL (crackjax-pool), STATE_DIR (.prefect-local: pid files and logs) and
# PREFECT_HOME (default STATE_DIR/home, the folder of the server's SQLite database).
# The server listens on 127.0.0.1 only. Run it from the repository root.
set -euo pipefail

PREFECT_BIN=${PREFECT_BIN:-.venv/bin/prefect}
PREFECT_PORT=${PREFECT_PORT:-4200}
PREFECT_POOL=${PREFECT_POOL:-crackjax-pool}
STATE_DIR=${STATE_DIR:-.prefect-local}
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)

export PREFECT_HOME=${PREFECT_HOME:-$STATE_DIR/home}
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_EXTRA_LOGGERS=crackjax

is_running() {
    [[ -f "$STATE_DIR/$1.pid" ]] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null
}

# Start a command in its own session (process group), so `stop` can end it with its children.
start() {
    local name=$1
    shift
    if is_running "$name"; then
        echo "$name already running (pid $(cat "$STATE_DIR/$name.pid"))"
        return
    fi
    setsid "$@" >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
    echo $! >"$STATE_DIR/$name.pid"
    echo "$name started (pid $!), log $STATE_DIR/$name.log"
}

wait_for_server() {
    for _ in $(seq 1 120); do
        if "${PREFECT_BIN%/prefect}/python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2).status != 200)" 2>/dev/null; then
            echo "server ready at $PREFECT_API_URL (UI: http://127.0.0.1:$PREFECT_PORT)"
            return
        fi
        if ! is_running server; then
            echo "server exited; see $STATE_DIR/server.log" >&2
            tail -n 20 "$STATE_DIR/server.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "server health check $PREFECT_API_URL/health timed out after 120 s; see $STATE_DIR/server.log" >&2
    exit 1
}

deploy() {
    "$PREFECT_BIN" work-pool inspect "$PREFECT_POOL" >/dev/null 2>&1 || "$PREFECT_BIN" work-pool create "$PREFECT_POOL" --type process
    "$PREFECT_BIN" --no-prompt deploy --all
}

# Stop the process group of `name`: SIGINT (Prefect's graceful shutdown), then SIGTERM
# after 15 s, then SIGKILL after 10 s more.
stop_one() {
    local name=$1 pid signal
    if ! is_running "$name"; then
        rm -f "$STATE_DIR/$name.pid"
        echo "$name not running"
        return
    fi
    pid=$(cat "$STATE_DIR/$name.pid")
    for signal in INT TERM; do
        kill "-$signal" -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 $([[ $signal == INT ]] && echo 15 || echo 10)); do
            kill -0 -- "-$pid" 2>/dev/null || break 2
            sleep 1
        done
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
        echo "$name (pid $pid) did not stop after SIGINT and SIGTERM; killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$STATE_DIR/$name.pid"
    echo "$name stopped"
}

case "${1:-}" in
    serve)
        start server "$PREFECT_BIN" server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off
        wait_for_server
        deploy
        start worker "$PREFECT_BIN" worker start --pool "$PREFECT_POOL" --type process --name crackjax-local-worker
        echo "export PREFECT_API_URL=$PREFECT_API_URL  # for prefect commands in other shells"
        ;;
    deploy)
        deploy
        ;;
    stop)
        stop_one worker
        stop_one server
        ;;
    *)
        echo "usage: $0 serve|deploy|stop" >&2
        exit 2
        ;;
esac
