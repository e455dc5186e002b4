# shellcheck shell=bash
#
# Shared helpers for scripts/run, scripts/test and scripts/fuzz (sourced, not executed).
#
# They provide, on a bare Debian machine, everything the `crm` service needs:
#   ensure_packages        install PostgreSQL / nats-server / a C compiler if missing
#   ensure_browser         install Debian's chromium and chromium-driver if missing (tests)
#   ensure_cargo           make sure `cargo` is on PATH (or explain how to get it)
#   free_port              print a free TCP port on 127.0.0.1
#   port_in_use PORT       true when something listens on PORT
#   start_postgres         private PostgreSQL under $CRM_DATA_DIR/pg -> DATABASE_URL
#   start_nats             private nats-server (JetStream) -> NATS_URL
#   ensure_secrets         $CRM_DATA_DIR/secrets.env -> CRM_JWT_SECRET, CRM_KEK
#   stop_private_services  stop only what *this* invocation started (for traps)
#   ensure_cargo_deny      install the pinned cargo-deny if missing
#   run_cargo_deny         `cargo deny check` (advisories skipped, with a message, when
#                          the advisory database cannot be had)
#   ensure_schemathesis    private virtualenv with the pinned schemathesis (scripts/fuzz)
#   ensure_jose_python     private virtualenv with the pinned PyJWT + cryptography
#                          (the receipts tests verify JWS with it) -> CRM_TEST_PYTHON
#   run_child / spawn_child / wait_child / on_signal
#                          run long commands so that INT/TERM reach them promptly
#
# A server found already running (started by an earlier or a concurrent
# invocation with the same $CRM_DATA_DIR) is reused and left running.
#
# Every message goes to stderr, prefixed with "[crm]". Secrets are never printed.
#
# Settings (environment):
#   CRM_DATA_DIR   where private state lives (default: <repo>/.data)
#   DATABASE_URL   when set, no private PostgreSQL is started
#   NATS_URL       when set, no private nats-server is started
#   CRM_PG_BIN     PostgreSQL bin directory (default: newest /usr/lib/postgresql/*/bin)
#   CRM_PG_OPTIONS more server options for a private PostgreSQL started now, e.g.
#                  "-c shared_preload_libraries=pg_stat_statements" (scripts/bench's
#                  BENCH_PG_STATS); a server already running keeps its own

# Let `set -e` apply inside $(...) too, so a failing helper aborts the caller.
shopt -s inherit_errexit

# Repository root: this file lives in <repo>/scripts/lib/.
CRM_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CRM_DATA_DIR="${CRM_DATA_DIR:-$CRM_REPO_ROOT/.data}"
mkdir -p "$CRM_DATA_DIR"
CRM_DATA_DIR="$(cd "$CRM_DATA_DIR" && pwd)" # absolute, so `cd` elsewhere is harmless
export CRM_REPO_ROOT CRM_DATA_DIR

# State of this invocation (what stop_private_services may stop).
_CRM_STARTED_PG=""   # non-empty once we launched PostgreSQL ourselves
_CRM_STARTED_NATS="" # non-empty once we launched nats-server ourselves
_CRM_NATS_PID=""
CRM_PG_BIN="${CRM_PG_BIN:-}" # PostgreSQL bin dir, resolved by pg_bin_dir
_CRM_PG_USER=""              # OS user that owns/runs the private cluster
_CRM_PG_DATA=""              # data directory of the private cluster
_CRM_PG_LOG=""

log() { printf '[crm] %s\n' "$*" >&2; }
die() {
    printf '[crm] ERROR: %s\n' "$*" >&2
    exit 1
}

# Run a command as root (directly when we are root, through sudo otherwise).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' but sudo is not installed"
    fi
}

# ---------------------------------------------------------------------------
# Locating binaries
# ---------------------------------------------------------------------------

# Print the PostgreSQL bin directory (newest /usr/lib/postgresql/*/bin, else the
# directory of `initdb` on PATH). Returns 1 when PostgreSQL is not installed.
pg_bin_dir() {
    if [[ -n $CRM_PG_BIN && -x $CRM_PG_BIN/initdb && -x $CRM_PG_BIN/pg_ctl ]]; then
        printf '%s\n' "$CRM_PG_BIN"
        return 0
    fi
    local dir
    # shellcheck disable=SC2012 # fixed, well-known paths; need version sort
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
    if [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dir="$(dirname "$(readlink -f "$(command -v initdb)")")"
        if [[ -x $dir/pg_ctl ]]; then
            printf '%s\n' "$dir"
        else
            dirname "$(command -v initdb)"
        fi
        return 0
    fi
    return 1
}

# Print the path of a PostgreSQL client tool (psql, createdb, pg_isready...).
pg_tool() {
    local name=$1 bin
    bin="$(pg_bin_dir 2>/dev/null || true)"
    if [[ -n $bin && -x $bin/$name ]]; then
        printf '%s\n' "$bin/$name"
    elif command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
    else
        return 1
    fi
}

# Print the path of nats-server (/usr/sbin is not on every user's PATH).
nats_server_bin() {
    local p
    for p in "$(command -v nats-server 2>/dev/null || true)" /usr/sbin/nats-server /usr/bin/nats-server \
        /usr/local/bin/nats-server "$HOME/go/bin/nats-server"; do
        if [[ -n $p && -x $p ]]; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

# ---------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------

# Install (Debian/Ubuntu, apt) whatever of PostgreSQL, nats-server and a C
# compiler (needed by `ring` when building) is missing. apt-get update runs
# only when something has to be installed.
ensure_packages() {
    local -a want=()
    local need_pg=""
    if ! pg_bin_dir >/dev/null; then
        need_pg=1
        want+=(postgresql postgresql-client)
    elif ! pg_tool psql >/dev/null; then
        want+=(postgresql-client)
    fi
    nats_server_bin >/dev/null || want+=(nats-server)
    command -v cc >/dev/null 2>&1 || want+=(gcc libc6-dev)

    if [[ ${#want[@]} -eq 0 ]]; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing packages (${want[*]}) and no apt-get here; install them by hand"
    fi
    log "installing: ${want[*]} (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
        die "apt-get update failed"
    # postgresql-contrib is a separate (possibly virtual/transitional) package
    # on some releases; add it only if apt knows it.
    if [[ -n $need_pg ]] && apt-cache show postgresql-contrib >/dev/null 2>&1; then
        want+=(postgresql-contrib)
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${want[@]}" >&2 ||
        die "apt-get install ${want[*]} failed"

    pg_bin_dir >/dev/null || die "PostgreSQL was installed but no initdb/pg_ctl was found"
    nats_server_bin >/dev/null || die "nats-server was installed but cannot be found"
}

# Install Debian's chromium and chromium-driver (the preference center's browser
# tests drive a real headless Chromium through WebDriver) when either is missing.
ensure_browser() {
    local -a want=()
    command -v chromium >/dev/null 2>&1 || want+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || want+=(chromium-driver)
    if [[ ${#want[@]} -eq 0 ]]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages (${want[*]}) and no apt-get here; install them by hand"
    log "installing: ${want[*]} (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
        die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${want[@]}" >&2 ||
        die "apt-get install ${want[*]} failed"
    command -v chromedriver >/dev/null 2>&1 ||
        die "chromium-driver was installed but chromedriver cannot be found"
}

# Make sure cargo is usable (rustup installs into ~/.cargo/bin, which a
# non-login shell may not have on PATH).
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found; install Rust (>= 1.85) with:  curl -sSf https://sh.rustup.rs | sh -s -- -y"
}

# ---------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------

# True when something accepts connections on 127.0.0.1:PORT, or (when `ss`
# exists) anything listens on PORT on any address.
port_in_use() {
    local port=$1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        return 0
    fi
    if command -v ss >/dev/null 2>&1 && [[ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]]; then
        return 0
    fi
    return 1
}

# Print a free TCP port (random, in 20000..59999) on 127.0.0.1.
free_port() {
    local i port
    for ((i = 0; i < 500; i++)); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        if ! port_in_use "$port"; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    die "could not find a free TCP port"
}

# Print the port remembered in FILE when it is still free, else a fresh free
# port (which is then remembered).
_remembered_port() {
    local file=$1 port=""
    [[ -f $file ]] && port="$(tr -dc '0-9' <"$file")"
    if [[ -z $port ]] || ((port < 1024 || port > 65535)) || port_in_use "$port"; then
        port="$(free_port)"
    fi
    printf '%s\n' "$port" >"$file"
    printf '%s\n' "$port"
}

# Serialise service start-up between concurrent invocations (run + test).
# The lock is file descriptor 9; long-lived servers are started with `9>&-` so
# they do not inherit (and keep holding) it.
_CRM_LOCKED=""
_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$CRM_DATA_DIR/.services.lock"
    flock -w 300 9 || die "timed out waiting for $CRM_DATA_DIR/.services.lock"
    _CRM_LOCKED=1
}
_unlock() {
    [[ -n $_CRM_LOCKED ]] || return 0
    exec 9>&-
    _CRM_LOCKED=""
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

# Run a command as the cluster's OS user (PostgreSQL refuses to run as root).
_as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u "$_CRM_PG_USER" -- "$@")
    else
        "$@"
    fi
}

# Decide who runs PostgreSQL and where its files live.
_pg_prepare_layout() {
    local base="$CRM_DATA_DIR"
    _CRM_PG_DATA="$base/pg"
    if [[ $EUID -ne 0 ]]; then
        _CRM_PG_USER="$(id -un)"
    else
        # Root: use the owner of an existing cluster, else `postgres` (created by
        # the Debian package), else a dedicated system user.
        local owner=""
        [[ -f $_CRM_PG_DATA/PG_VERSION ]] && owner="$(stat -c %U "$(readlink -f "$_CRM_PG_DATA")")"
        if [[ -n $owner && $owner != root ]]; then
            _CRM_PG_USER="$owner"
        elif id -u postgres >/dev/null 2>&1; then
            _CRM_PG_USER=postgres
        else
            if ! id -u crm-pg >/dev/null 2>&1; then
                log "creating system user crm-pg to run PostgreSQL"
                useradd --system --no-create-home --home-dir /nonexistent \
                    --shell /usr/sbin/nologin crm-pg
            fi
            _CRM_PG_USER=crm-pg
        fi
        # That user must be able to reach $CRM_DATA_DIR (not the case under
        # /root, mode 700). Then keep the cluster in /var/lib/crm-pg/<hash> and
        # leave a symlink $CRM_DATA_DIR/pg pointing at it.
        if ! runuser -u "$_CRM_PG_USER" -- test -x "$CRM_DATA_DIR" 2>/dev/null; then
            local key
            key="$(printf '%s' "$CRM_DATA_DIR" | cksum | cut -d' ' -f1)"
            base="/var/lib/crm-pg/$key"
            mkdir -p "$base"
            chown "$_CRM_PG_USER" "$base"
            chmod 755 /var/lib/crm-pg
            if [[ ! -e $CRM_DATA_DIR/pg && ! -L $CRM_DATA_DIR/pg ]]; then
                ln -s "$base/pg" "$CRM_DATA_DIR/pg"
            fi
            [[ -e $CRM_DATA_DIR/pg.log || -L $CRM_DATA_DIR/pg.log ]] || ln -s "$base/pg.log" "$CRM_DATA_DIR/pg.log"
            log "user $_CRM_PG_USER cannot reach $CRM_DATA_DIR; PostgreSQL files are in $base"
            _CRM_PG_DATA="$base/pg"
        fi
    fi
    _CRM_PG_LOG="$base/pg.log"
    # Unix socket directory: writable by the cluster user; socket paths are
    # limited to ~107 bytes, so fall back to /tmp for very long paths.
    _CRM_PG_SOCK="$base/pg-sock"
    if ((${#_CRM_PG_SOCK} > 90)); then
        _CRM_PG_SOCK="/tmp/crm-pg-sock-$(printf '%s' "$_CRM_PG_DATA" | cksum | cut -d' ' -f1)"
    fi
    mkdir -p "$_CRM_PG_DATA" "$_CRM_PG_SOCK"
    touch "$_CRM_PG_LOG"
    if [[ $EUID -eq 0 ]]; then
        chown "$_CRM_PG_USER" "$_CRM_PG_DATA" "$_CRM_PG_SOCK" "$_CRM_PG_LOG"
    fi
    chmod 700 "$_CRM_PG_DATA"
    chmod 750 "$_CRM_PG_SOCK"
}

# Port of a running cluster (line 4 of postmaster.pid).
_pg_running_port() {
    sed -n 4p "$_CRM_PG_DATA/postmaster.pid" 2>/dev/null | tr -dc '0-9'
}

# Settings of the private PostgreSQL beyond its defaults, sized for this machine. The
# defaults are for a machine of the 1990s: 128 MB of shared buffers make a backend
# write out a dirty page for nearly every page it reads once the read models outgrow
# them, and a 1 GB WAL budget forces a checkpoint every half minute under load, after
# which every first change of a page logs the whole page again. So: an eighth of the
# memory for shared buffers (between 128 MB and 2 GB), a 2 GB WAL budget and a 15
# minute checkpoint interval, and full-page images compressed with lz4 (PostgreSQL 15
# and later). Measured: docs/benchmarks.md, "AI actions".
_pg_settings() {
    local mem_kb shared_mb major
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)"
    shared_mb=$((${mem_kb:-0} / 8 / 1024))
    ((shared_mb < 128)) && shared_mb=128
    ((shared_mb > 2048)) && shared_mb=2048
    printf -- '-c shared_buffers=%dMB -c max_wal_size=2GB -c checkpoint_timeout=15min' "$shared_mb"
    major="$("$CRM_PG_BIN/pg_ctl" --version | awk '{print $3}')"
    major="${major%%.*}"
    if [[ $major =~ ^[0-9]+$ ]] && ((major >= 15)); then
        printf -- ' -c wal_compression=lz4'
    fi
}

# Start (or reuse) the private PostgreSQL; export DATABASE_URL.
start_postgres() {
    if [[ -n ${DATABASE_URL:-} ]]; then
        log "PostgreSQL: using DATABASE_URL from the environment"
        return 0
    fi
    CRM_PG_BIN="$(pg_bin_dir)" || die "PostgreSQL is not installed (run ensure_packages)"
    _lock
    _pg_prepare_layout

    # A cluster made by another major version needs that version's binaries.
    if [[ -f $_CRM_PG_DATA/PG_VERSION ]]; then
        local ver have
        ver="$(cat "$_CRM_PG_DATA/PG_VERSION")"
        # "pg_ctl (PostgreSQL) 15.8 (Debian ...)" -> 15.8
        have="$("$CRM_PG_BIN/pg_ctl" --version | awk '{print $3}')"
        if [[ $have != "$ver" && $have != "$ver".* ]]; then
            if [[ -x /usr/lib/postgresql/$ver/bin/pg_ctl ]]; then
                CRM_PG_BIN="/usr/lib/postgresql/$ver/bin"
            else
                die "$_CRM_PG_DATA was created by PostgreSQL $ver, but only $have is installed"
            fi
        fi
    elif [[ -n "$(ls -A "$_CRM_PG_DATA")" ]]; then
        # Leftover of an interrupted initdb: not a usable cluster. Keep it aside.
        local aside
        aside="$_CRM_PG_DATA.broken-$(date +%Y%m%d%H%M%S)"
        log "$_CRM_PG_DATA is not a complete cluster; moving it to $aside"
        mv "$_CRM_PG_DATA" "$aside"
        mkdir -p "$_CRM_PG_DATA"
        if [[ $EUID -eq 0 ]]; then chown "$_CRM_PG_USER" "$_CRM_PG_DATA"; fi
        chmod 700 "$_CRM_PG_DATA"
    fi
    export CRM_PG_BIN

    # initdb, once.
    if [[ ! -f $_CRM_PG_DATA/PG_VERSION ]]; then
        local locale=C
        # (no grep -q: with pipefail an early-closing grep would fail the pipe)
        if locale -a 2>/dev/null | grep -ixE 'c\.utf-?8' >/dev/null; then locale=C.UTF-8; fi
        log "initialising PostgreSQL cluster in $_CRM_PG_DATA (user $_CRM_PG_USER)"
        _as_pg "$CRM_PG_BIN/initdb" -D "$_CRM_PG_DATA" --auth=trust -U postgres \
            --encoding=UTF8 --locale="$locale" >>"$_CRM_PG_LOG" 2>&1 ||
            die "initdb failed; see $_CRM_PG_LOG: $(tail -n 20 "$_CRM_PG_LOG")"
    fi

    local port
    if _as_pg "$CRM_PG_BIN/pg_ctl" -D "$_CRM_PG_DATA" status >/dev/null 2>&1; then
        # Already running (started by an earlier or concurrent invocation): reuse
        # it, and leave it running when we exit.
        port="$(_pg_running_port)"
        [[ -n $port ]] || die "PostgreSQL runs from $_CRM_PG_DATA but its port is unknown"
        printf '%s\n' "$port" >"$CRM_DATA_DIR/pg.port"
        log "PostgreSQL: reusing running server on 127.0.0.1:$port"
    else
        port="$(_remembered_port "$CRM_DATA_DIR/pg.port")"
        log "PostgreSQL: starting on 127.0.0.1:$port (log: $_CRM_PG_LOG)"
        _CRM_STARTED_PG=1 # set before starting, so an interrupt still stops it
        _as_pg "$CRM_PG_BIN/pg_ctl" -D "$_CRM_PG_DATA" -l "$_CRM_PG_LOG" -w -t 60 \
            -o "-p $port -k '$_CRM_PG_SOCK' -c listen_addresses=127.0.0.1 -c max_connections=300 -c idle_in_transaction_session_timeout=60000 -c fsync=on -c log_autovacuum_min_duration=1s $(_pg_settings) ${CRM_PG_OPTIONS:-}" \
            start 9>&- >/dev/null ||
            die "PostgreSQL did not start; last lines of $_CRM_PG_LOG:
$(tail -n 30 "$_CRM_PG_LOG")"
    fi

    # Ready for TCP connections? (a reused server may still be starting up)
    local i isready
    isready="$(pg_tool pg_isready)" || die "pg_isready not found (install postgresql-client)"
    for ((i = 0; i < 300; i++)); do
        "$isready" -q -h 127.0.0.1 -p "$port" -U postgres && break
        sleep 0.1
    done
    "$isready" -q -h 127.0.0.1 -p "$port" -U postgres ||
        die "PostgreSQL on 127.0.0.1:$port does not accept connections; see $_CRM_PG_LOG"

    # Database `crm`, once.
    local psql createdb
    psql="$(pg_tool psql)" || die "psql not found (install postgresql-client)"
    createdb="$(pg_tool createdb)" || die "createdb not found (install postgresql-client)"
    if [[ "$("$psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -XtAc \
        "select 1 from pg_database where datname = 'crm'")" != 1 ]]; then
        log "creating database crm"
        "$createdb" -h 127.0.0.1 -p "$port" -U postgres crm
    fi
    _unlock

    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/crm"
    log "DATABASE_URL=$DATABASE_URL"
}

_stop_postgres() {
    [[ -n $_CRM_STARTED_PG ]] || return 0
    _CRM_STARTED_PG=""
    # Interrupted while pg_ctl was starting it? Give the postmaster a moment to
    # write its pid file, so that it is stopped too.
    local i
    for ((i = 0; i < 10; i++)); do
        [[ -f $_CRM_PG_DATA/postmaster.pid ]] && break
        sleep 0.1
    done
    if _as_pg "$CRM_PG_BIN/pg_ctl" -D "$_CRM_PG_DATA" status >/dev/null 2>&1; then
        log "stopping private PostgreSQL"
        _as_pg "$CRM_PG_BIN/pg_ctl" -D "$_CRM_PG_DATA" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            log "warning: pg_ctl stop failed; see $_CRM_PG_LOG"
    fi
}

# ---------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------

# True when PID is a live nats-server process.
_is_nats_pid() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null || echo nats-server)" == nats-server* ]]
}

# Start (or reuse) the private nats-server with JetStream; export NATS_URL.
start_nats() {
    if [[ -n ${NATS_URL:-} ]]; then
        log "NATS: using NATS_URL from the environment"
        return 0
    fi
    local bin
    bin="$(nats_server_bin)" || die "nats-server is not installed (run ensure_packages)"
    _lock
    local pidfile="$CRM_DATA_DIR/nats.pid" logfile="$CRM_DATA_DIR/nats.log"
    local portfile="$CRM_DATA_DIR/nats.port" pid="" port=""
    [[ -f $pidfile ]] && pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -f $portfile ]] && port="$(tr -dc '0-9' <"$portfile")"

    if [[ -n $pid && -n $port ]] && _is_nats_pid "$pid" && port_in_use "$port"; then
        log "NATS: reusing running server on 127.0.0.1:$port (pid $pid)"
    else
        rm -f "$pidfile"
        port="$(_remembered_port "$portfile")"
        mkdir -p "$CRM_DATA_DIR/nats"
        log "NATS: starting on 127.0.0.1:$port (log: $logfile)"
        # setsid: own session, so a Ctrl-C on the terminal does not reach it
        # directly; our trap stops it in order. -P makes nats-server write its
        # own pid early (setsid may fork when we are a process-group leader, in
        # which case $! is only the launcher's pid).
        local -a detach=()
        if command -v setsid >/dev/null 2>&1; then detach=(setsid); fi
        "${detach[@]}" "$bin" -a 127.0.0.1 -p "$port" -js -sd "$CRM_DATA_DIR/nats" \
            -P "$pidfile" </dev/null >>"$logfile" 2>&1 9>&- &
        local launcher=$! i ready=""
        _CRM_STARTED_NATS=1
        _CRM_NATS_PID=$launcher
        for ((i = 0; i < 200; i++)); do # 20 s
            pid=""
            [[ -s $pidfile ]] && pid="$(tr -dc '0-9' <"$pidfile")"
            [[ -n $pid ]] && _CRM_NATS_PID=$pid
            if [[ -n $pid ]] && port_in_use "$port"; then
                ready=1
                break
            fi
            if ! kill -0 "$launcher" 2>/dev/null && { [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; }; then
                break # died
            fi
            sleep 0.1
        done
        if [[ -z $ready ]]; then
            _stop_nats
            die "nats-server did not accept connections on 127.0.0.1:$port within 20s; last lines of $logfile:
$(tail -n 30 "$logfile")"
        fi
    fi
    _unlock
    export NATS_URL="nats://127.0.0.1:$port"
    log "NATS_URL=$NATS_URL"
}

_stop_nats() {
    [[ -n $_CRM_STARTED_NATS ]] || return 0
    _CRM_STARTED_NATS=""
    local pid=$_CRM_NATS_PID i
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping private nats-server (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "nats-server ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true # reap (it is our child)
    fi
    rm -f "$CRM_DATA_DIR/nats.pid"
}

# ---------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------

# Stop whatever this invocation started (nats first, then PostgreSQL).
# Safe to call several times and from traps; never fails.
stop_private_services() {
    _stop_nats || true
    _stop_postgres || true
}

# ---------------------------------------------------------------------------
# Foreground work that signals can interrupt
# ---------------------------------------------------------------------------
#
# Bash runs a trap only after the current foreground command ends, so a
# SIGTERM sent to the script alone would wait for a whole `cargo test`. Long
# commands therefore run as a background child in their own session
# (spawn_child + wait_child); the script traps INT/TERM/HUP with on_signal,
# which forwards SIGTERM to the child's whole process group (cargo, rustc,
# test binaries...). A second signal sends SIGKILL.
#
#   trap 'on_signal INT' INT; trap 'on_signal TERM' TERM; trap 'on_signal HUP' HUP
#   run_child cargo build

CRM_CHILD_PID=""  # running child, if any
CRM_INTERRUPTED="" # name of the first signal received (INT, TERM, HUP)
_CRM_CHILD_SIGNALLED=""

# Start "$@" in the background, in its own session when `setsid` exists.
spawn_child() {
    local -a detach=()
    if command -v setsid >/dev/null 2>&1; then detach=(setsid); fi
    "${detach[@]}" "$@" 9>&- &
    CRM_CHILD_PID=$!
    _CRM_CHILD_SIGNALLED=""
}

# Wait for the child; return its exit status. If the script got a signal
# meanwhile, exit with 128+signal instead (the EXIT trap then cleans up).
wait_child() {
    local rc=0
    while [[ -n $CRM_CHILD_PID ]]; do
        if wait "$CRM_CHILD_PID"; then rc=0; else rc=$?; fi
        # `wait` also returns (>128) when a trapped signal arrives.
        kill -0 "$CRM_CHILD_PID" 2>/dev/null || CRM_CHILD_PID=""
    done
    if [[ -n $CRM_INTERRUPTED ]]; then
        exit "$(_signal_status "$CRM_INTERRUPTED")"
    fi
    return "$rc"
}

run_child() {
    spawn_child "$@"
    wait_child
}

# Ask the child (its whole process group) to stop: TERM first, KILL next time.
stop_child() {
    local pid=$CRM_CHILD_PID sig=TERM
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    [[ -n $_CRM_CHILD_SIGNALLED ]] && sig=KILL
    _CRM_CHILD_SIGNALLED=1
    kill -"$sig" -- "-$pid" 2>/dev/null || kill -"$sig" "$pid" 2>/dev/null || true
}

_signal_status() {
    case $1 in
    INT) echo 130 ;;
    TERM) echo 143 ;;
    HUP) echo 129 ;;
    *) echo 1 ;;
    esac
}

# Trap handler for INT/TERM/HUP (see above).
# shellcheck disable=SC2317 # invoked by trap
on_signal() {
    local sig=$1
    CRM_INTERRUPTED=${CRM_INTERRUPTED:-$sig}
    if [[ -n $CRM_CHILD_PID ]] && kill -0 "$CRM_CHILD_PID" 2>/dev/null; then
        log "received SIG$sig; stopping ${CRM_CHILD_NAME:-the running command}"
        stop_child
        return 0
    fi
    exit "$(_signal_status "$sig")"
}

# ---------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------

# Create $CRM_DATA_DIR/secrets.env once (mode 600), then export CRM_JWT_SECRET
# and CRM_KEK from it unless they are already set in the environment.
ensure_secrets() {
    local file="$CRM_DATA_DIR/secrets.env"
    _lock # two first runs at once must not both write a secret
    (
        umask 077
        touch "$file"
        if ! grep -q '^CRM_JWT_SECRET=' "$file"; then
            # 32 random bytes as 64 hex characters.
            printf 'CRM_JWT_SECRET=%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >>"$file"
        fi
        if ! grep -q '^CRM_KEK=' "$file"; then
            # Key-encryption key: 32 random bytes, base64.
            printf 'CRM_KEK=%s\n' "$(head -c 32 /dev/urandom | base64 | tr -d '\n')" >>"$file"
        fi
    )
    chmod 600 "$file"
    _unlock
    # Parse (rather than source) the file: KEY=VALUE lines only.
    # (not `IFS== read key value`: that would drop a trailing "=" of base64)
    local line key value
    while IFS= read -r line || [[ -n $line ]]; do
        key=${line%%=*}
        value=${line#*=}
        case $key in
        CRM_JWT_SECRET | CRM_KEK)
            if [[ -z ${!key:-} ]]; then
                printf -v "$key" '%s' "$value"
                export "${key?}"
            fi
            ;;
        esac
    done <"$file"
    [[ -n ${CRM_JWT_SECRET:-} && -n ${CRM_KEK:-} ]] || die "could not load secrets from $file"
    log "secrets: loaded (from the environment or $file)"
}

# ---------------------------------------------------------------------------
# cargo-deny (deny.toml: advisories, licences, bans, sources)
# ---------------------------------------------------------------------------

# The version scripts/test installs and runs: deny.toml is written for it.
# (0.20.2 needs rustc >= 1.88.)
CRM_CARGO_DENY_VERSION=0.20.2
# Copies of the advisory database older than this are not used (cargo-deny's own
# default limit).
CRM_ADVISORY_DB_MAX_AGE_DAYS=90

# Install cargo-deny $CRM_CARGO_DENY_VERSION into ~/.cargo/bin unless it is there.
ensure_cargo_deny() {
    local have=""
    have="$(cargo deny --version 2>/dev/null | awk '{print $2}' || true)"
    [[ $have == "$CRM_CARGO_DENY_VERSION" ]] && return 0
    log "installing cargo-deny $CRM_CARGO_DENY_VERSION${have:+ (found $have)}: cargo install --locked, a few minutes, once per machine"
    CRM_CHILD_NAME="cargo install cargo-deny"
    run_child cargo install --locked --quiet cargo-deny --version "$CRM_CARGO_DENY_VERSION" ||
        die "cargo install cargo-deny $CRM_CARGO_DENY_VERSION failed"
    have="$(cargo deny --version 2>/dev/null | awk '{print $2}' || true)"
    [[ $have == "$CRM_CARGO_DENY_VERSION" ]] ||
        die "cargo-deny $CRM_CARGO_DENY_VERSION was installed but \`cargo deny --version\` says '${have:-nothing}' (is ~/.cargo/bin on PATH?)"
}

# Newest usable copy of the RustSec advisory database already on disk (cargo-deny's
# default db-path, $CARGO_HOME/advisory-dbs), or nothing.
_advisory_db_on_disk() {
    local root="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs" dir when now
    now="$(date +%s)"
    for dir in "$root"/advisory-db-*; do
        [[ -d $dir/crates ]] || continue
        when="$(git -C "$dir" log -1 --format=%ct 2>/dev/null || true)"
        [[ $when =~ ^[0-9]+$ ]] || continue
        if ((now - when <= CRM_ADVISORY_DB_MAX_AGE_DAYS * 86400)); then
            printf '%s\n' "$dir"
            return 0
        fi
        log "advisory database copy $dir is older than $CRM_ADVISORY_DB_MAX_AGE_DAYS days ($(date -u -d "@$when" +%F)); not used"
    done
    return 1
}

# `cargo deny check` in the repository root; returns its exit status.
#
# Licences, bans and sources need only the crates.io index. Advisories need the
# RustSec advisory database, a git repository on GitHub: it is fetched when that
# works; otherwise a recent copy already on disk is used (offline); otherwise the
# advisories check alone is skipped, with a message saying so, and does not fail
# the run. CRM_DENY_ADVISORIES=0 skips it on purpose.
run_cargo_deny() {
    local -a checks=(advisories bans licenses sources) global=()
    local fetch_log="$CRM_DATA_DIR/cargo-deny-fetch.log" db
    if [[ ${CRM_DENY_ADVISORIES:-1} == 0 ]]; then
        checks=(bans licenses sources)
        log "cargo deny: advisories skipped (CRM_DENY_ADVISORIES=0)"
    elif timeout 180 cargo deny fetch db >"$fetch_log" 2>&1; then
        log "cargo deny: advisory database fetched"
    elif db="$(_advisory_db_on_disk)"; then
        log "cargo deny: the advisory database cannot be fetched (see $fetch_log); using the copy in $db (last change $(git -C "$db" log -1 --format=%cs))"
        # --offline also keeps `cargo metadata` offline: have every crate of the graph
        # (all platforms) downloaded first.
        cargo fetch --quiet || return 1
        global=(--offline)
    else
        checks=(bans licenses sources)
        log "cargo deny: advisories SKIPPED: the RustSec advisory database is a git repository on GitHub, which this machine cannot reach ($(awk 'match($0, /Could not resolve host: [^ ]+/) { print substr($0, RSTART, RLENGTH); found = 1; exit } END { if (!found) print "see " FILENAME }' "$fetch_log")), and there is no copy of it under ${CARGO_HOME:-$HOME/.cargo}/advisory-dbs younger than $CRM_ADVISORY_DB_MAX_AGE_DAYS days. Licences, bans and sources are still checked."
    fi
    log "cargo deny check ${checks[*]}"
    CRM_CHILD_NAME="cargo deny"
    run_child cargo deny "${global[@]}" check --hide-inclusion-graph "${checks[@]}"
}

# ---------------------------------------------------------------------------
# schemathesis (scripts/fuzz)
# ---------------------------------------------------------------------------

# schemathesis 4.x, from PyPI, in a virtualenv of its own under the data folder.
# 4.32.5 needs Python >= 3.11.
CRM_SCHEMATHESIS_VERSION=4.32.5

# Print a python3 (>= 3.11) that can make virtualenvs; install Debian's when missing.
_python_for_venv() {
    local py
    for py in "${CRM_PYTHON:-}" python3 python3.13 python3.12 python3.11 /usr/bin/python3; do
        [[ -n $py ]] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || continue
        command -v "$py"
        return 0
    done
    return 1
}

# Like _python_for_venv; installs Debian's python3 and python3-venv when there is none.
_python_for_venv_or_install() {
    local py
    if py="$(_python_for_venv)"; then
        printf '%s\n' "$py"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "need Python >= 3.11 with venv (set CRM_PYTHON)"
    log "installing python3 and python3-venv (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends python3 python3-venv >&2 ||
        die "apt-get install python3 python3-venv failed"
    _python_for_venv || die "no Python >= 3.11 with venv after installing python3-venv (set CRM_PYTHON)"
}

# Make $CRM_DATA_DIR/fuzz/venv-schemathesis-$CRM_SCHEMATHESIS_VERSION once; set
# CRM_SCHEMATHESIS (its `st`) and CRM_FUZZ_PYTHON (its python).
ensure_schemathesis() {
    local venv="$CRM_DATA_DIR/fuzz/venv-schemathesis-$CRM_SCHEMATHESIS_VERSION" py
    export CRM_SCHEMATHESIS="$venv/bin/st" CRM_FUZZ_PYTHON="$venv/bin/python"
    if [[ -x $CRM_SCHEMATHESIS && -f $venv/.complete ]] &&
        [[ "$("$CRM_SCHEMATHESIS" --version 2>/dev/null)" == *" $CRM_SCHEMATHESIS_VERSION" ]]; then
        return 0
    fi
    py="$(_python_for_venv_or_install)"
    log "installing schemathesis $CRM_SCHEMATHESIS_VERSION into $venv (pip, $("$py" --version))"
    rm -rf "$venv"
    "$py" -m venv "$venv" || die "python -m venv $venv failed"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        "schemathesis==$CRM_SCHEMATHESIS_VERSION" >&2 ||
        die "pip install schemathesis==$CRM_SCHEMATHESIS_VERSION failed"
    [[ "$("$CRM_SCHEMATHESIS" --version 2>/dev/null)" == *" $CRM_SCHEMATHESIS_VERSION" ]] ||
        die "schemathesis was installed but \`st --version\` does not say $CRM_SCHEMATHESIS_VERSION"
    touch "$venv/.complete"
}

# ---------------------------------------------------------------------------
# PyJWT + cryptography (the receipts tests: a second JOSE implementation)
# ---------------------------------------------------------------------------

# The consent receipts' integration tests verify each JWS with PyJWT, whose EdDSA is
# the `cryptography` package's (OpenSSL's Ed25519), not the Rust code that signed it.
CRM_PYJWT_VERSION=2.10.1
CRM_PY_CRYPTOGRAPHY_VERSION=44.0.3
# The webhooks tests verify every delivery with the official Standard Webhooks library
# for Python (tests/py/webhook_receiver.py), not with the Rust code that signed it.
CRM_PY_STANDARDWEBHOOKS_VERSION=1.3.0

# Make $CRM_DATA_DIR/venv-jose once (again when the pins change); export
# CRM_TEST_PYTHON (its python). tests/tests/integration/receipts.rs calls this too
# when CRM_TEST_PYTHON is unset, so the pins live here only. Under a lock: tests run
# in parallel processes.
ensure_jose_python() {
    local venv="$CRM_DATA_DIR/venv-jose"
    local pins="pyjwt[crypto]==$CRM_PYJWT_VERSION cryptography==$CRM_PY_CRYPTOGRAPHY_VERSION standardwebhooks==$CRM_PY_STANDARDWEBHOOKS_VERSION"
    export CRM_TEST_PYTHON="$venv/bin/python"
    (
        flock -w 600 8 || die "timed out waiting for $CRM_DATA_DIR/.venv-jose.lock"
        if [[ -x $CRM_TEST_PYTHON && "$(cat "$venv/.complete" 2>/dev/null)" == "$pins" ]]; then
            exit 0
        fi
        py="$(_python_for_venv_or_install)"
        log "installing $pins into $venv (pip, $("$py" --version))"
        rm -rf "$venv"
        "$py" -m venv "$venv" || die "python -m venv $venv failed"
        # shellcheck disable=SC2086 # $pins is two words on purpose
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input $pins >&2 ||
            die "pip install $pins failed"
        "$CRM_TEST_PYTHON" -c 'import jwt, cryptography, standardwebhooks' ||
            die "PyJWT or standardwebhooks was installed but does not import"
        printf '%s' "$pins" >"$venv/.complete"
    ) 8>"$CRM_DATA_DIR/.venv-jose.lock"
}
