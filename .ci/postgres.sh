#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests, reachable on loopback only.
#
#   eval "$(.ci/postgres.sh start)"   # prints: export LSSTPIPE_PG_DIR=… and export LSSTPIPE_TEST_PG_URL=…
#   .ci/postgres.sh stop [DIR]        # DIR defaults to $LSSTPIPE_PG_DIR
#
# start: installs Debian's postgresql if initdb/pg_ctl are missing; creates a cluster in a new directory
# under ${LSSTPIPE_PG_PARENT:-/tmp} owned by an unprivileged user (as root: the 'postgres' user, or a
# dedicated 'lsstpipe-pg' user when there is none); listens on 127.0.0.1 only, on a free port, with its
# unix socket inside that directory; waits until it accepts connections; creates the database; writes the
# export lines to DIR/env.sh (mode 600: the URL holds a random password) and prints them on stdout.
# Everything else goes to stderr, so that stdout can be eval'ed.
# The cluster is for tests: fsync and synchronous commit are off.
set -euo pipefail

DB_NAME=lsstpipe_test
DB_USER=lsstpipe
MARKER=.lsstpipe-test-postgres

say() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
        echo "$d"
    elif command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"
    fi
}

install_postgres() {
    say "initdb/pg_ctl not found: installing Debian's postgresql (no default cluster is created)"
    [[ $(id -u) -eq 0 ]] || { say "run as root to install postgresql, or install it yourself"; exit 1; }
    # Debian would otherwise create and start a 'main' cluster on port 5432; we want only ours.
    mkdir -p /etc/postgresql-common
    [[ -e /etc/postgresql-common/createcluster.conf ]] ||
        echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confold postgresql >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local bindir owner dir port pw url i
    bindir=$(find_bindir)
    if [[ -z "$bindir" ]]; then
        install_postgres
        bindir=$(find_bindir)
        [[ -n "$bindir" ]] || { say "postgresql installed but initdb not found under /usr/lib/postgresql/*/bin"; exit 1; }
    fi
    # The server refuses to run as root: run it as an unprivileged user.
    if [[ $(id -u) -eq 0 ]]; then
        if id -u postgres >/dev/null 2>&1; then
            owner=postgres
        else
            id -u lsstpipe-pg >/dev/null 2>&1 ||
                useradd --system --no-create-home --shell /usr/sbin/nologin lsstpipe-pg
            owner=lsstpipe-pg
        fi
        as_owner() { runuser -u "$owner" -- "$@"; }
    else
        owner=$(id -un)
        as_owner() { "$@"; }
    fi
    dir=$(mktemp -d "${LSSTPIPE_PG_PARENT:-/tmp}/lsstpipe-pg.XXXXXX")
    touch "$dir/$MARKER"
    # A start that fails half-way leaves no server and no directory behind.
    trap 'say "start failed: cleaning up"; stop "$dir" || true' EXIT
    mkdir "$dir/socket"
    chown -R "$owner" "$dir"
    chmod 700 "$dir"
    as_owner test -w "$dir" ||
        { say "user $owner cannot write $dir: set LSSTPIPE_PG_PARENT to a directory it can reach"; exit 1; }
    pw=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    (umask 077 && echo "$pw" >"$dir/pwfile")
    chown "$owner" "$dir/pwfile"
    # Password (SCRAM) over TCP; trust on the socket, which only the owner (and root) can reach.
    as_owner "$bindir/initdb" -D "$dir/data" -U "$DB_USER" --pwfile="$dir/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; say "initdb failed"; exit 1; }
    rm -f "$dir/pwfile"
    for i in 1 2 3 4 5; do
        port=$(free_port)
        if as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o \
            "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir/socket -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            start >&2; then
            break
        fi
        say "start on port $port failed (attempt $i):"
        tail -n 5 "$dir/server.log" >&2 || true
        port=""
    done
    [[ -n "$port" ]] || { say "could not start PostgreSQL; see $dir/server.log"; exit 1; }
    for i in $(seq 1 100); do
        "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" && break
        sleep 0.1
    done
    "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" || { say "server does not accept connections"; exit 1; }
    as_owner "$bindir/createdb" -h "$dir/socket" -p "$port" -U "$DB_USER" "$DB_NAME"
    url="postgresql://$DB_USER:$pw@127.0.0.1:$port/$DB_NAME"
    (umask 077 && printf 'export LSSTPIPE_PG_DIR=%s\nexport LSSTPIPE_TEST_PG_URL=%s\n' "$dir" "$url" >"$dir/env.sh")
    say "PostgreSQL $("$bindir/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port, data in $dir"
    trap - EXIT
    cat "$dir/env.sh"
    echo "# written to $dir/env.sh"
}

stop() {
    local dir=${1:-${LSSTPIPE_PG_DIR:-}} bindir owner
    [[ -n "$dir" ]] || { say "stop: give the directory (or set LSSTPIPE_PG_DIR)"; exit 1; }
    [[ -e "$dir/$MARKER" ]] || { say "stop: $dir is not a directory made by 'postgres.sh start'; not touching it"; exit 1; }
    bindir=$(find_bindir)
    if [[ -n "$bindir" && -f "$dir/data/postmaster.pid" ]]; then
        owner=$(stat -c %U "$dir/data")
        if [[ $(id -u) -eq 0 ]]; then
            runuser -u "$owner" -- "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
        else
            "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
        fi
    fi
    rm -rf -- "$dir"
    say "stopped and removed $dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | stop [DIR]" >&2; exit 2 ;;
esac
