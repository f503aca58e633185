#!/bin/sh
# Entry point of the compose stack's EMQX node (docker-compose.yml, service cloud-emqx): start
# the image's own entry point with two secrets make-secrets.sh made, read from Docker secrets
# as the image's user (uid 1000) and handed to EMQX in its environment, so they never appear in
# the container's spec (`docker inspect`), on a command line or in a log line:
#   * the dashboard's first admin password (dashboard.default_password: used when EMQX creates
#     the admin user in a fresh data volume; change it later with `emqx ctl admins passwd`);
#   * the Erlang cluster cookie (node.cookie), instead of EMQX's published default.
set -eu
for name in emqx_dashboard_password emqx_cookie; do
  if [ ! -r "/run/secrets/$name" ]; then
    echo "edgewise emqx entrypoint: cannot read /run/secrets/$name as uid $(id -u):" \
      "run 'sudo compose/make-secrets.sh'" >&2
    exit 2
  fi
done
EMQX_DASHBOARD__DEFAULT_PASSWORD=$(cat /run/secrets/emqx_dashboard_password)
EMQX_NODE__COOKIE=$(cat /run/secrets/emqx_cookie)
export EMQX_DASHBOARD__DEFAULT_PASSWORD EMQX_NODE__COOKIE
exec /usr/bin/docker-entrypoint.sh "$@"
