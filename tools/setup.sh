# Shared set-up for tools/demo, tools/test and tools/bench (sourced, not run).
#
#   guestfs_setup EXTRAS [NEED...]
#
# Installs what is missing on a fresh Debian machine, as root, and is quick (a couple of
# seconds) when everything is there. Always: the base Debian packages (APT_PACKAGES), a
# virtual environment in .venv and guestfs[EXTRAS] in editable mode, with the versions
# of tools/constraints.txt (what the tests run with); then the command where mount(8)
# finds it (/usr/local/bin/guestfs, a link into .venv: the last set-up wins) and the
# manual guestfs(1), generated from the parser (/usr/local/share/man/man1). Then each NEED:
#   example   pyfuse3's sdist, whose examples/tmpfs.py is a tools/bench peer, into the
#             cache folder tools/benchlib/example.py reads (it never downloads itself)
#   postgres  PostgreSQL (tools/db-experiment postgres)
#   vm        QEMU, a Debian kernel and busybox (tools/vm-demo)
# (the Debian packages of postgres and vm are listed in tools/clients/apt.py).
#
# Every step with work to do says so on stderr ("setup: ..."), says every 30 s that it
# is still at it, and has a time limit of its own; a download that fails or stalls past
# its limit is tried once more. A base step that fails ends the calling script. A NEED
# that cannot be had is a loud warning: its reason goes to .venv/setup-status/NEED.missing,
# the tests that need it are skipped with that reason (tools/setup_status.py reads it)
# and tools/bench reports a missing peer as such. .venv/setup-status/result says how the
# last set-up ended: running, complete, incomplete (a NEED missing) or failed.
set -euo pipefail

GUESTFS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$GUESTFS_ROOT/.venv"
CONSTRAINTS="$GUESTFS_ROOT/tools/constraints.txt"
SETUP_STATUS="$VENV/setup-status"
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config swig device-tree-compiler attr acl sqlite3 stress-ng fio man-db rsync git)
APT_OPTIONS=(-y -qq -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)

# Time limits in seconds, per try of a step. Generous: a slow mirror on a loaded 2-core
# machine still fits, a stalled download does not hang set-up for ever.
LIMIT_APT_UPDATE=300
LIMIT_APT_DOWNLOAD=900    # the VM packages are a few hundred MiB
LIMIT_APT_INSTALL=1800    # dpkg (a kernel builds its initramfs); one try: no download
LIMIT_VENV=300
LIMIT_PIP=900
LIMIT_SDIST=180           # normally about 6 s
HEARTBEAT=30

_setup_say() { echo "setup: $*" >&2; }

_setup_result() { echo "$*" > "$SETUP_STATUS/result"; }

_setup_fail() {  # a base step failed: nothing can run without it
    _setup_result "failed: $*"
    _setup_say "FAILED: $*"
    exit 1
}

_setup_heartbeat() {  # LABEL LIMIT T0: a line every HEARTBEAT s while a step runs
    while sleep "$HEARTBEAT" </dev/null >/dev/null 2>&1; do
        _setup_say "still $1 ($(( $(date +%s) - $3 )) s so far; limit $2 s per try)"
    done
}

_SETUP_STEP_PID=
_SETUP_HEARTBEAT_PID=
_setup_interrupted() {
    [ -n "$_SETUP_STEP_PID" ] && kill -TERM "$_SETUP_STEP_PID" 2>/dev/null
    [ -n "$_SETUP_HEARTBEAT_PID" ] && kill "$_SETUP_HEARTBEAT_PID" 2>/dev/null
    _setup_result "failed: interrupted"
    _setup_say "interrupted"
    exit 130
}

# run_step LABEL LIMIT TRIES COMMAND...: run COMMAND (its output into a log) with a
# time limit per try; up to TRIES tries (2 for a download: a second one after a failure
# or a stall). On failure STEP_ERROR says why, with the log's last lines.
STEP_ERROR=
run_step() {
    local label=$1 limit=$2 tries=$3 log rc=0 try=0 t0
    shift 3
    t0=$(date +%s)
    log=$(mktemp)
    _setup_say "$label ..."
    _setup_heartbeat "$label" "$limit" "$t0" &
    _SETUP_HEARTBEAT_PID=$!
    while [ "$try" -lt "$tries" ]; do
        try=$((try + 1))
        # timeout runs COMMAND in a process group of its own and kills all of it on
        # expiry; in the background, so that a Ctrl-C here can end it (the trap).
        timeout -k 30 "$limit" "$@" </dev/null >"$log" 2>&1 &
        _SETUP_STEP_PID=$!
        rc=0
        wait "$_SETUP_STEP_PID" || rc=$?
        _SETUP_STEP_PID=
        [ "$rc" -eq 0 ] && break
        if [ "$try" -lt "$tries" ]; then
            if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
                _setup_say "$label stalled (no end within $limit s); trying once more"
            else
                _setup_say "$label failed (exit $rc); trying once more"
            fi
        fi
    done
    kill "$_SETUP_HEARTBEAT_PID" 2>/dev/null || true
    wait "$_SETUP_HEARTBEAT_PID" 2>/dev/null || true
    _SETUP_HEARTBEAT_PID=
    if [ "$rc" -eq 0 ]; then
        _setup_say "$label: done in $(( $(date +%s) - t0 )) s"
        rm -f "$log"
        return 0
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        STEP_ERROR="$label: no end within $limit s ($try tries)"
    else
        STEP_ERROR="$label: exit $rc ($try tries): $(grep -v '^[[:space:]]*$' "$log" \
            | tail -n 4 | tr '\n' ' ' | cut -c1-600)"
    fi
    rm -f "$log"
    return 1
}

missing_apt() {  # PACKAGE...: those dpkg does not have installed, one line
    local installed p out=()
    installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "$@" 2>/dev/null || true)
    for p in "$@"; do
        grep -qx "ii  $p" <<<"$installed" || out+=("$p")
    done
    echo "${out[*]}"
}

_SETUP_APT_UPDATED=0
# apt_install WHAT RECOMMENDS PACKAGE...: install the missing ones; download first (safe
# to stop and try again), then install from the downloaded files.
apt_install() {
    local what=$1 recommends=$2 missing opts
    shift 2
    missing=$(missing_apt "$@")
    [ -z "$missing" ] && return 0
    opts=("${APT_OPTIONS[@]}")
    [ "$recommends" = no ] && opts+=(--no-install-recommends)
    export DEBIAN_FRONTEND=noninteractive
    if [ "$_SETUP_APT_UPDATED" = 0 ]; then
        run_step "updating the Debian package lists" "$LIMIT_APT_UPDATE" 2 \
            apt-get update -qq -o Acquire::Retries=3 || return 1
        _SETUP_APT_UPDATED=1
    fi
    # shellcheck disable=SC2086
    run_step "downloading $what (Debian: $missing)" "$LIMIT_APT_DOWNLOAD" 2 \
        apt-get install "${opts[@]}" --download-only $missing || return 1
    # shellcheck disable=SC2086
    run_step "installing $what" "$LIMIT_APT_INSTALL" 1 apt-get install "${opts[@]}" $missing
}

install_base() {
    local extras=$1 pkgs=("${APT_PACKAGES[@]}") want stamp="$VENV/.installed"
    # A Debian python3 without ensurepip cannot make a virtual environment.
    python3 -c "import ensurepip" 2>/dev/null || pkgs+=(python3-venv)
    apt_install "the base Debian packages" yes "${pkgs[@]}" || _setup_fail "$STEP_ERROR"
    if [ ! -x "$VENV/bin/python" ]; then
        run_step "creating $VENV" "$LIMIT_VENV" 1 python3 -m venv "$VENV" \
            || _setup_fail "$STEP_ERROR"
    fi
    # Reinstall only when pyproject.toml, the constraints or the wanted extras changed.
    want="$(cat "$GUESTFS_ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1) $extras"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        run_step "installing guestfs[$extras] into $VENV (pip)" "$LIMIT_PIP" 2 \
            "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" \
            -e "$GUESTFS_ROOT[$extras]" || _setup_fail "$STEP_ERROR"
        echo "$want" > "$stamp"
    fi
    install_command
}

# install_command: /usr/local/bin/guestfs (mount.fuse3 runs `guestfs` with the shell's
# default search path, so a venv's bin would not do) and guestfs(1), when root. A
# /usr/local/bin/guestfs that is not a link (someone else's) is left alone, loudly.
install_command() {
    local bin=/usr/local/bin/guestfs mandir=/usr/local/share/man/man1 page
    [ "$(id -u)" = 0 ] || return 0
    if [ -L "$bin" ] || [ ! -e "$bin" ]; then
        [ "$(readlink "$bin" 2>/dev/null)" = "$VENV/bin/guestfs" ] \
            || ln -sfn "$VENV/bin/guestfs" "$bin"
    else
        _setup_say "WARNING: $bin is not a link into a guestfs set-up; left as it is, so" \
            "'mount -t fuse.guestfs' runs that one"
    fi
    page="$mandir/guestfs.1"
    # Regenerated when the command line may have changed (or the page is missing).
    if [ ! -s "$page" ] || [ -n "$(find "$GUESTFS_ROOT/guestfs/cli" "$GUESTFS_ROOT/pyproject.toml" \
            -newer "$page" -print -quit)" ] || ! grep -qxF ".\\\" from $GUESTFS_ROOT" "$page"; then
        mkdir -p "$mandir"
        "$VENV/bin/python" -m guestfs.cli.manpage > "$page.tmp" \
            || _setup_fail "could not generate the manual page guestfs(1)"
        mv "$page.tmp" "$page"
    fi
}

_tools_python() {  # the venv's Python with tools/ importable
    PYTHONPATH="$GUESTFS_ROOT/tools${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" "$@"
}

# get_need NEED: 0 when it is there (now); else 1 with STEP_ERROR.
get_need() {
    local path pkgs
    case "$1" in
        example)
            path=$(_tools_python -m benchlib.example check 2>/dev/null) && return 0
            [ -n "$path" ] || { STEP_ERROR="cannot tell the sdist's path"; return 1; }
            run_step "downloading pyfuse3's sdist into ${path%/*}" "$LIMIT_SDIST" 2 \
                env PYTHONPATH="$GUESTFS_ROOT/tools" "$VENV/bin/python" -m benchlib.example fetch
            ;;
        postgres | vm)
            pkgs=$(_tools_python -m clients.apt packages "$1") \
                || { STEP_ERROR="no package list for $1"; return 1; }
            # shellcheck disable=SC2086
            apt_install "$(_need_title "$1")" no $pkgs
            ;;
        *) _setup_fail "unknown set-up need '$1' (example, postgres or vm)" ;;
    esac
}

_need_title() {  # NEED: what it is, in words (one list, in tools/setup_status.py)
    _tools_python -c 'import sys, setup_status; print(setup_status.WHAT[sys.argv[1]])' "$1"
}

guestfs_setup() {
    local extras=${1:-test} need missing=()
    shift || true
    mkdir -p "$SETUP_STATUS"
    trap _setup_interrupted INT TERM
    _setup_result "running: guestfs_setup $extras $*"
    install_base "$extras"
    for need in "$@"; do
        if get_need "$need"; then
            rm -f "$SETUP_STATUS/$need.missing"
        else
            echo "$STEP_ERROR" > "$SETUP_STATUS/$need.missing"
            missing+=("$need")
            _setup_say "WARNING: could not get $(_need_title "$need"): $STEP_ERROR"
            if [ "$need" = example ]; then
                _setup_say "WARNING: tools/bench (and its test) will report that peer as" \
                    "missing, with this reason; the next set-up tries again"
            else
                _setup_say "WARNING: tests that need it will be skipped, with this reason;" \
                    "the next set-up tries again"
            fi
        fi
    done
    trap - INT TERM
    if [ "${#missing[@]}" -gt 0 ]; then
        _setup_result "incomplete: could not get ${missing[*]} (see $SETUP_STATUS/*.missing)"
    else
        _setup_result complete
    fi
    export PATH="$VENV/bin:$PATH"
}
