#!/usr/bin/env bash
# Make the secrets compose/docker-compose.yml mounts (compose/secrets/, never committed), each
# one mode 0400 and owned by exactly the container user that reads it (docs/security.md,
# "Compose secrets"):
#   * a random password per principal, <principal>_password (the bridge's two:
#     bridge_site_password, bridge_cloud_password): the edgewise image's user, the uid of
#     compose/Dockerfile's `useradd --uid`; but operator_password, which no container mounts,
#     is for the operator's commands on the host: the user who ran sudo (else root);
#   * site.passwd, cloud.passwd (hashed by mosquitto_passwd: Debian's mosquitto package, or the
#     eclipse-mosquitto:2 image when it is not installed) and mosquitto-server.key: Mosquitto's
#     user (MOSQUITTO_UID in compose/.env);
#   * emqx-users.csv, emqx-server.key, emqx-dashboard.password, emqx-cookie (profile "emqx"):
#     EMQX's user (EMQX_UID in compose/.env);
#   * grafana-admin.password (profile "observability"): Grafana's user (GRAFANA_UID in .env);
#   * certs/: a CA and a server certificate for site-broker, cloud, localhost (openssl). The two
#     certificates are public (0644); the keys stay root's (0400; the brokers get copies above).
# Only root can give files to other users:
#   sudo ./make-secrets.sh [--out DIR]      # for the containers (DIR: default compose/secrets)
#   ./make-secrets.sh --local [--out DIR]   # for services you run as local processes yourself
#                                           # (as the tests do): every file yours, mode 0400
# Re-running keeps existing passwords and certificates; delete the directory to start over.
set -euo pipefail
cd "$(dirname "$0")"
ARGS="$*"
die() { echo "make-secrets.sh: $*" >&2; exit 2; }

OUT="${EDGEWISE_SECRETS_DIR:-secrets}"
LOCAL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --local) LOCAL=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (usage: make-secrets.sh [--local] [--out DIR])" ;;
  esac
done

# Who reads what: the edgewise image's uid from its Dockerfile, the broker images' from .env.
EDGEWISE_UID=$(sed -n 's/.*useradd .*--uid \([0-9][0-9]*\).*/\1/p' Dockerfile)
env_uid() { sed -n "s/^$1=\([0-9][0-9]*\)[[:space:]]*\$/\1/p" .env; }
MOSQUITTO_UID=$(env_uid MOSQUITTO_UID)
EMQX_UID=$(env_uid EMQX_UID)
GRAFANA_UID=$(env_uid GRAFANA_UID)
[ -n "$EDGEWISE_UID" ] || die "compose/Dockerfile has no 'useradd ... --uid N'"
[ -n "$MOSQUITTO_UID" ] || die "compose/.env has no MOSQUITTO_UID=N"
[ -n "$EMQX_UID" ] || die "compose/.env has no EMQX_UID=N"
[ -n "$GRAFANA_UID" ] || die "compose/.env has no GRAFANA_UID=N"
if [ "$LOCAL" = 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "the containers read these files as uid $EDGEWISE_UID (edgewise), uid $MOSQUITTO_UID" \
      "(mosquitto), uid $EMQX_UID (emqx) and uid $GRAFANA_UID (grafana), and only root can give" \
      "a file to another user:" \
      "nothing was written." \
      "Run: sudo $0${ARGS:+ $ARGS}   (or add --local for services you run as local processes" \
      "yourself)"
fi

umask 077
mkdir -p "$OUT/certs"
S=$(cd "$OUT" && pwd)
chmod 0700 "$S" "$S/certs"

SITE_USERS=(cam-1 cam-2 gw-1 gw-2 gw-1-esc gw-2-esc bridge-s1 monitor operator)
CLOUD_USERS=(bridge-s1 worker-1 worker-2 operator)
BRIDGE=bridge-s1 # its two passwords: bridge_site_password, bridge_cloud_password

random() { # random [length]: letters and digits, at least one of each
  local s=""
  until [[ "$s" =~ [0-9] && "$s" =~ [A-Za-z] ]]; do
    s=$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n' | cut -c1-"${1:-32}")
  done
  printf '%s\n' "$s"
}
password() { # password <file>: make it once
  [ -s "$1" ] || random > "$1"
}
for u in cam-1 cam-2 gw-1 gw-2 gw-1-esc gw-2-esc worker-1 worker-2 monitor operator; do
  password "$S/${u}_password"
done
password "$S/bridge_site_password"
password "$S/bridge_cloud_password"
password "$S/emqx-dashboard.password"
password "$S/emqx-cookie"
password "$S/grafana-admin.password"

pw_of() { # pw_of <side> <user>
  if [ "$2" = "$BRIDGE" ]; then cat "$S/bridge_$1_password"; else cat "$S/$2_password"; fi
}

passwd_tool() {
  if command -v mosquitto_passwd >/dev/null 2>&1; then
    mosquitto_passwd "$@"
  else
    docker run --rm -v "$S:/s" eclipse-mosquitto:2 mosquitto_passwd "${@/#$S\//\/s\/}"
  fi
}
for side in site cloud; do
  file="$S/$side.passwd"
  rm -f "$file" && : > "$file"
  if [ "$side" = site ]; then users=("${SITE_USERS[@]}"); else users=("${CLOUD_USERS[@]}"); fi
  for u in "${users[@]}"; do passwd_tool -b "$file" "$u" "$(pw_of "$side" "$u")"; done
done

rm -f "$S/emqx-users.csv"
{
  echo "user_id,password,is_superuser"
  for u in "${CLOUD_USERS[@]}"; do echo "$u,$(pw_of cloud "$u"),false"; done
} > "$S/emqx-users.csv"

# The fleet's update keys (docs/model-updates.md): the nodes are enrolled with root.pub (public,
# mounted into them); root.key and the release key are the operator's, on the host, never
# mounted. Made with the project's own CLI (`edgewise keys init`), once.
K="$S/fleet-keys"
if [ ! -s "$K/root.pub" ]; then
  EDGEWISE_CLI="${EDGEWISE_CLI:-$(command -v edgewise || true)}"
  [ -n "$EDGEWISE_CLI" ] || [ ! -x ../.venv/bin/edgewise ] || EDGEWISE_CLI=../.venv/bin/edgewise
  [ -n "$EDGEWISE_CLI" ] ||
    die "the fleet's keys are made by 'edgewise keys init': install the CLI first" \
        "('pip install .' or '../dev.sh demo' once), or set EDGEWISE_CLI"
  "$EDGEWISE_CLI" keys init --out-dir "$K" >/dev/null
fi

C="$S/certs"
if [ ! -s "$C/server.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -subj "/CN=edgewise-ca" -keyout "$C/ca.key" -out "$C/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=site-broker" -keyout "$C/server.key" -out "$C/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:site-broker,DNS:cloud,DNS:cloud-broker,DNS:cloud-emqx,DNS:localhost,IP:127.0.0.1\n' \
    > "$C/san.ext"
  openssl x509 -req -in "$C/server.csr" -CA "$C/ca.crt" -CAkey "$C/ca.key" \
    -CAcreateserial -days 825 -extfile "$C/san.ext" -out "$C/server.crt" 2>/dev/null
  rm -f "$C/server.csr" "$C/san.ext"
fi
# Each broker reads the server key as its own user: one copy each.
for broker in mosquitto emqx; do
  rm -f "$S/$broker-server.key"
  cp "$C/server.key" "$S/$broker-server.key"
done

own() { # own <uid> <file>...: readable by that user only (with --local: by you only)
  local uid=$1; shift
  [ "$LOCAL" = 1 ] || chown "$uid:$uid" "$@"
  chmod 0400 "$@"
}
own "$EDGEWISE_UID" "$S"/*_password
own "${SUDO_UID:-$(id -u)}" "$S/operator_password" # the operator's, on the host
own "$MOSQUITTO_UID" "$S/site.passwd" "$S/cloud.passwd" "$S/mosquitto-server.key"
own "$EMQX_UID" "$S/emqx-users.csv" "$S/emqx-server.key" "$S/emqx-dashboard.password" \
  "$S/emqx-cookie"
own "$GRAFANA_UID" "$S/grafana-admin.password"
own "$(id -u)" "$C/ca.key" "$C/server.key" "$C"/*.srl # the CA and the master key: never mounted
# The fleet's keys are the operator's (the user who ran sudo): private keys 0600 as `keys init`
# made them; root.pub (0644) is mounted into the nodes.
chmod 0700 "$K" && chmod 0644 "$K"/*.pub
[ "$LOCAL" = 1 ] || chown -R "${SUDO_UID:-$(id -u)}:${SUDO_GID:-$(id -g)}" "$K"
chmod 0644 "$C/ca.crt" "$C/server.crt"
echo "make-secrets.sh: $S ready ($(find "$S" -type f | wc -l) files$([ "$LOCAL" = 1 ] && echo ", all yours"))"
