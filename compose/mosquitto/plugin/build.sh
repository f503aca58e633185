#!/bin/sh
# Build the edgewise_clientid Mosquitto plugin into OUT_DIR, unless OUT_DIR already holds it
# built from this very source (OUT_DIR/edgewise_clientid.so.sha256 records the source's hash).
#   compose/mosquitto/plugin/build.sh OUT_DIR
# Needs a C compiler and Mosquitto's plugin headers (mosquitto_broker.h, mosquitto_plugin.h,
# mosquitto.h): Debian/Ubuntu `apt-get install gcc libc6-dev mosquitto-dev libmosquitto-dev`,
# Alpine `apk add build-base mosquitto-dev`. Used by ./dev.sh (into the virtualenv, where the
# tests find it) and by compose/mosquitto/Dockerfile (the compose brokers).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
src="$here/edgewise_clientid.c"
so="$out/edgewise_clientid.so"
want=$(sha256sum "$src" | cut -d' ' -f1)
if [ -f "$so" ] && [ "$(cat "$so.sha256" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
mkdir -p "$out"
${CC:-cc} -std=c99 -O2 -Wall -Wextra -Werror -fPIC -shared "$src" -o "$so.tmp"
mv "$so.tmp" "$so"
echo "$want" > "$so.sha256"
echo "built $so" >&2
