#!/usr/bin/env bash
# minard's one entry point on a fresh machine (Debian 12, Python 3.11).
#
#   ./manage.sh up      install what is missing, then run the main job
#   ./manage.sh test    install what is missing, then run the test suite
#   ./manage.sh setup   only install (apt packages, .venv, pip packages)
#
# Installing is idempotent and quick when nothing changed.  apt-get runs only for
# packages that are missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}
APT_PACKAGES=(redis-server nginx-light chromium)

log() { printf '[manage] %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

install_apt() {
    local missing=()
    have redis-server || missing+=(redis-server)
    have nginx || missing+=(nginx-light)
    have chromium || missing+=(chromium)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian packages start system services; minard runs its own instances.
    for svc in redis-server nginx; do
        $sudo service "$svc" stop >/dev/null 2>&1 || true
    done
}

install_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        "$PY" -m venv "$VENV"
    fi
    # Reinstall only when the package metadata changed since the last install.
    local stamp="$VENV/.minard-installed"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing Python packages into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,dev]'
        touch "$stamp"
    fi
}

setup() {
    install_apt
    install_python
}

cmd=${1:-up}
shift || true
case "$cmd" in
    setup)
        setup ;;
    up)
        setup
        exec "$VENV/bin/minard" demo "$@" ;;
    test)
        setup
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *)
        echo "usage: $0 up|test|setup" >&2; exit 2 ;;
esac
