#!/usr/bin/env bash
# edgewise developer entry point: the README's two commands.
#   ./dev.sh demo [edgewise demo options]   set up and run the demo
#   ./dev.sh test [pytest options]          set up and run lint, type checks and the tests
# Set-up is automatic and idempotent: a virtualenv in .venv with the project installed, and for
# the tests the Mosquitto broker and clients (from Debian's packages when running as root) and
# the edgewise_clientid Mosquitto plugin the secured broker configs load, built from C
# (compose/mosquitto/plugin) into $VENV/lib/edgewise-mosquitto/, where the tests find it, and
# Prometheus (Debian's package), which scrapes `edgewise fleet exporter` in its test.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EDGEWISE_VENV:-.venv}"

die() { echo "dev.sh: $*" >&2; exit 2; }

pick_python() {
  for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  die "Python 3.11 or newer is required (apt-get install python3)"
}

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then return 1; fi
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "dev.sh: installing $* from the distribution's packages" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}

ensure_venv() {
  local extras="$1" py stamp want
  if [ ! -x "$VENV/bin/python" ]; then
    py=$(pick_python)
    if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      apt_install python3-venv || die "cannot create a virtualenv: apt-get install python3-venv"
      "$py" -m venv "$VENV"
    fi
  fi
  stamp="$VENV/.edgewise-installed"
  want="$(sha256sum < pyproject.toml | cut -c1-16) $extras"
  have="$(cat "$stamp" 2>/dev/null || true)"
  # The test extra is a superset of the plain install: the demo runs in a test venv as it is.
  if [ "$have" != "$want" ] && ! { [ -z "$extras" ] && [ "${have%% *}" = "${want%% *}" ]; }; then
    echo "dev.sh: installing edgewise${extras:+[$extras]} into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}" >"$VENV/pip.log" 2>&1; then
      cat "$VENV/pip.log" >&2
      die "installing the project failed (log above, also in $VENV/pip.log)"
    fi
    echo "$want" > "$stamp"
  fi
}

ensure_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    command -v mosquitto_pub >/dev/null 2>&1 && return 0
  fi
  apt_install mosquitto mosquitto-clients ||
    die "the tests need Mosquitto: run 'sudo apt-get install mosquitto mosquitto-clients'"
}

# The exporter's test scrapes it with a real Prometheus (docs/observability.md).
ensure_prometheus() {
  command -v prometheus >/dev/null 2>&1 && return 0
  apt_install --no-install-recommends prometheus ||
    die "the tests need Prometheus: run 'sudo apt-get install --no-install-recommends prometheus'"
}

# The plugin compose/mosquitto/{site,cloud}/mosquitto.conf load (docs/security.md, "Connection
# identity"): compiled against Mosquitto's plugin headers, rebuilt only when its source changes.
PLUGIN_DIR="$VENV/lib/edgewise-mosquitto"
ensure_clientid_plugin() {
  if ! command -v cc >/dev/null 2>&1 ||
     ! printf '#include <mosquitto.h>\n#include <mosquitto_broker.h>\n#include <mosquitto_plugin.h>\n' |
       cc -E -x c - >/dev/null 2>&1; then
    apt_install gcc libc6-dev mosquitto-dev libmosquitto-dev ||
      die "building the Mosquitto plugin needs a C compiler and Mosquitto's headers: run 'sudo apt-get install gcc libc6-dev mosquitto-dev libmosquitto-dev'"
  fi
  compose/mosquitto/plugin/build.sh "$PLUGIN_DIR" ||
    die "building compose/mosquitto/plugin/edgewise_clientid.c failed (compiler output above)"
}

cmd="${1:-}"; [ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_venv ""
    exec "$VENV/bin/edgewise" demo "$@"
    ;;
  test)
    ensure_venv "test"
    ensure_mosquitto
    ensure_clientid_plugin
    ensure_prometheus
    export PATH="$PATH:/usr/sbin"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    # The layers of docs/adr/0001-layout.md ([tool.importlinter] in pyproject.toml).
    "$VENV/bin/lint-imports" --no-cache
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo [options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
