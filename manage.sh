#!/usr/bin/env bash
# minard's one entry point on a fresh machine (Debian 12, Python 3.11).
#
#   ./manage.sh up      install what is missing, then start the whole stack (minard up)
#   ./manage.sh test    install what is missing, then run the test suite
#   ./manage.sh setup   only install (apt packages, .venv, pip packages)
#
# Installing is idempotent and quick when nothing changed.  apt-get runs only for
# packages that are missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}

log() { printf '[manage] %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

apt_install() {
    log "installing Debian packages: $*"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    if [ -z "${APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_apt() {
    local missing=()
    have redis-server || missing+=(redis-server)
    have redis-sentinel || missing+=(redis-sentinel)
    have ip || missing+=(iproute2)
    have nginx || missing+=(nginx-light)
    have chromium || missing+=(chromium)
    have npm || missing+=(npm)
    have openssl || missing+=(openssl)
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_install "${missing[@]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    # The Debian packages start system services; minard runs its own instances.
    for svc in redis-server redis-sentinel nginx; do
        $sudo service "$svc" stop >/dev/null 2>&1 || true
    done
}

install_python() {
    if [ ! -x "$VENV/bin/pip" ]; then
        log "creating virtualenv $VENV"
        # Debian's own python3 needs the python3-venv package for this.
        if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv
            "$PY" -m venv "$VENV"
        fi
    fi
    # Reinstall only when the package metadata changed since the last install.
    local stamp="$VENV/.minard-installed"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing Python packages into $VENV"
        # (This machine's pip.conf may name local package folders that do not
        # exist; pip warns about each one, which is noise, not a problem.)
        "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,dev]' 2>&1 \
            | { grep -v "^WARNING: Location 'file:" || true; }
        touch "$stamp"
    fi
}

# Front-end libraries come from the npm registry (versions pinned in
# package.json / package-lock.json) and are copied into static/vendor, so the
# site needs no internet and no CDN at run time.
VENDOR_FILES=(
    node_modules/uplot/dist/uPlot.iife.min.js
    node_modules/uplot/dist/uPlot.min.css
    node_modules/d3/dist/d3.min.js
)

install_static() {
    local stamp=static/vendor/.installed
    if [ -f "$stamp" ] && [ ! package-lock.json -nt "$stamp" ]; then
        return 0
    fi
    log "vendoring front-end libraries into static/vendor"
    npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null
    mkdir -p static/vendor
    cp "${VENDOR_FILES[@]}" static/vendor/
    touch "$stamp"
}

setup() {
    install_apt
    install_python
    install_static
}

cmd=${1:-up}
shift || true
case "$cmd" in
    setup)
        setup ;;
    up)
        setup
        exec "$VENV/bin/minard" up "$@" ;;
    test)
        setup
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *)
        echo "usage: $0 up|test|setup" >&2; exit 2 ;;
esac
