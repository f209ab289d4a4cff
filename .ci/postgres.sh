#!/usr/bin/env bash
# Start (start DIR PORT) or stop (stop DIR) a throw-away PostgreSQL server on 127.0.0.1 for tests.
set -euo pipefail
action=$1 dir=$2
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
case $action in
start)
    port=$3
    mkdir -p "$dir" && chown postgres "$dir"
    su postgres -c "$bin/initdb -D '$dir/data' -A trust -U postgres >/dev/null"
    su postgres -c "$bin/pg_ctl -D '$dir/data' -l '$dir/server.log' -w -o \"-h 127.0.0.1 -p $port -k '$dir'\" start >/dev/null"
    su postgres -c "$bin/psql -h 127.0.0.1 -p $port -U postgres -qc \"CREATE ROLE ragsweep LOGIN PASSWORD 'ci-secret'\" -c 'CREATE DATABASE ragsweep_test OWNER ragsweep'"
    ;;
stop)
    # Also run by .ci/run's exit trap, after the tests' stop: then there is nothing to stop.
    if [ -d "$dir/data" ]; then
        su postgres -c "$bin/pg_ctl -D '$dir/data' -m fast -w stop >/dev/null" || true
    fi
    rm -rf "$dir"
    ;;
esac
