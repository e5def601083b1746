#!/usr/bin/env bash
# Installs the system services bento-canary runs (nginx with Lua, Redis) when missing.
# As root it uses apt-get; otherwise it prints one line saying what to install.
set -euo pipefail
# prometheus ships promtool (alert rules are checked with it); docker-compose validates the
# compose file offline (no engine is needed for `docker-compose config`).
pkgs=(nginx-light redis-server libnginx-mod-http-lua lua-resty-core prometheus docker-compose wrk)
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=(libnginx-mod-http-lua)
[ -d /usr/share/lua/5.1/resty/core ] || missing+=(lua-resty-core)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # the load generator of `make bench`
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
else
    echo "bento-canary needs these system packages; please install them: sudo apt-get install ${missing[*]}" >&2
fi
