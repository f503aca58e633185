#!/usr/bin/env bash
# Make what compose/docker-compose.yml expects in compose/secrets/ (never committed):
#   * one random password per principal (files named <principal>_password, mode 600);
#   * site.passwd and cloud.passwd, hashed by mosquitto_passwd (from Debian's mosquitto package,
#     or the eclipse-mosquitto:2 image when it is not installed);
#   * emqx-users.csv for the "emqx" profile;
#   * certs/: a CA and a server certificate for site-broker, cloud, localhost (openssl).
# Re-running keeps existing passwords and certificates; delete compose/secrets/ to start over.
set -euo pipefail
cd "$(dirname "$0")"
umask 077
mkdir -p secrets/certs
S=secrets

SITE_USERS=(cam-1 cam-2 gw-1 gw-2 gw-1-esc gw-2-esc bridge operator)
CLOUD_USERS=(bridge worker-1 worker-2 operator)

password() { # password <file>: make it once
  [ -s "$1" ] || head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$1"
}
for u in cam-1 cam-2 gw-1 gw-2 gw-1-esc gw-2-esc worker-1 worker-2 operator; do password "$S/${u}_password"; done
password "$S/bridge_site_password"
password "$S/bridge_cloud_password"

pw_of() { # pw_of <side> <user>
  if [ "$2" = bridge ]; then cat "$S/bridge_$1_password"; else cat "$S/$2_password"; fi
}

passwd_tool() {
  if command -v mosquitto_passwd >/dev/null 2>&1; then
    mosquitto_passwd "$@"
  else
    docker run --rm -v "$PWD/$S:/s" eclipse-mosquitto:2 mosquitto_passwd "${@/#$S\//\/s\/}"
  fi
}
for side in site cloud; do
  file="$S/$side.passwd"
  : > "$file"
  if [ "$side" = site ]; then users=("${SITE_USERS[@]}"); else users=("${CLOUD_USERS[@]}"); fi
  for u in "${users[@]}"; do passwd_tool -b "$file" "$u" "$(pw_of "$side" "$u")"; done
done

{
  echo "user_id,password,is_superuser"
  for u in "${CLOUD_USERS[@]}"; do echo "$u,$(pw_of cloud "$u"),false"; done
} > "$S/emqx-users.csv"

if [ ! -s "$S/certs/server.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -subj "/CN=edgewise-ca" -keyout "$S/certs/ca.key" -out "$S/certs/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=site-broker" -keyout "$S/certs/server.key" -out "$S/certs/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:site-broker,DNS:cloud,DNS:cloud-broker,DNS:cloud-emqx,DNS:localhost,IP:127.0.0.1\n' \
    > "$S/certs/san.ext"
  openssl x509 -req -in "$S/certs/server.csr" -CA "$S/certs/ca.crt" -CAkey "$S/certs/ca.key" \
    -CAcreateserial -days 825 -extfile "$S/certs/san.ext" -out "$S/certs/server.crt" 2>/dev/null
  rm -f "$S/certs/server.csr" "$S/certs/san.ext"
fi
# The brokers and services run as other users inside their containers: readable, not public.
chmod 644 "$S/certs/ca.crt" "$S/certs/server.crt"
chmod 640 "$S/certs/server.key" "$S"/*.passwd "$S"/*_password "$S/emqx-users.csv"
echo "compose/secrets ready: $(ls "$S" | wc -l) files"
