#!/usr/bin/env bash
# Installs the system services bento-canary runs (nginx with Lua, Redis) when missing.
# As root it uses apt-get; otherwise it prints one line saying what to install.
set -euo pipefail
pkgs=(nginx-light redis-server libnginx-mod-http-lua lua-resty-core)
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=(libnginx-mod-http-lua)
[ -d /usr/share/lua/5.1/resty/core ] || missing+=(lua-resty-core)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
else
    echo "bento-canary needs these system packages; please install them: sudo apt-get install ${missing[*]}" >&2
fi
