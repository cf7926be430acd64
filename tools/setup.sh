# Shared set-up for tools/demo, tools/test and tools/bench (sourced, not run).
# Installs what is missing on a fresh Debian machine as root, quickly when all is there:
# Debian packages, a virtual environment in .venv, and guestfs in editable mode.
set -euo pipefail

GUESTFS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$GUESTFS_ROOT/.venv"
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config swig device-tree-compiler attr sqlite3 stress-ng fio)

missing_apt() {
    local p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

install_apt() {
    local missing
    missing=$(missing_apt)
    # A Debian python3 without ensurepip cannot make a virtual environment.
    python3 -c "import ensurepip" 2>/dev/null || missing="$missing python3-venv"
    [ -z "$missing" ] && return 0
    echo "setup: installing Debian packages: $(echo $missing)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >/dev/null
}

install_venv() {
    local stamp="$VENV/.installed" extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml or the wanted extras changed.
    local want
    want="$(sha256sum "$GUESTFS_ROOT/pyproject.toml" | cut -d' ' -f1) $extras"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup: installing guestfs[$extras] into $VENV" >&2
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$GUESTFS_ROOT[$extras]"
        echo "$want" > "$stamp"
    fi
}

guestfs_setup() {
    install_apt
    install_venv "${1:-test}"
    export PATH="$VENV/bin:$PATH"
}
