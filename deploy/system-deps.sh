#!/usr/bin/env bash
# Installs the system services bento-canary runs (nginx with Lua, Redis) and every binary its
# tests drive, when missing. As root it uses apt-get; otherwise it prints one line saying what
# to install. A test whose binary is missing fails with "run `make setup`", so this list is
# the one place that says what a machine needs.
set -euo pipefail
# prometheus ships promtool (alert rules are checked with it); docker-compose validates the
# compose file offline (no engine is needed for `docker-compose config`) and runs the compose
# target. docker.io is the container engine (canary starts dockerd when none runs) and
# debootstrap builds the base images from Debian packages (`canary base-image`).
pkgs=(nginx-light redis-server libnginx-mod-http-lua lua-resty-core prometheus docker-compose wrk docker.io debootstrap)
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=(libnginx-mod-http-lua)
[ -d /usr/share/lua/5.1/resty/core ] || missing+=(lua-resty-core)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # the load generator of `make bench`
# h2load (nghttp2-client): `make bench`'s gRPC load generator, in C (bench/h2grpc.py)
pkgs+=(nghttp2-client)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# The prediction log's production sink: tests start a throwaway server (initdb + postgres, as
# the postgres user when run as root); Debian keeps the binaries in /usr/lib/postgresql/<major>/bin.
pkgs+=(postgresql)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
# `canary score --engine spark`: pyspark 4 runs on a Java 17+ JVM.
pkgs+=(openjdk-17-jre-headless)
java -version 2>&1 | grep 'version "\(1[7-9]\|[2-9][0-9]\)' >/dev/null || missing+=(openjdk-17-jre-headless)  # not -q (pipefail)
# The engine: any installed dockerd will do (Docker's own docker-ce conflicts with docker.io).
# Debian's client (20.10) builds with BuildKit by itself; a newer `docker` without the buildx
# plugin cannot, and canary then uses /usr/bin/docker (deploy/engine.py).
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
# tests/deploy/test_k8s.py renders deploy/k8s with a real kustomize: kubectl's built-in one or the
# standalone binary. The overlays use `components:` (kustomize >= 3.7, kubectl >= 1.21), so
# Debian's own kubectl (`kubernetes-client`, 1.20 in bookworm) cannot render them and bookworm
# has no kustomize package: the package is `kubectl`, from an apt source that carries it (the
# Kubernetes or Google Cloud SDK repository). This project's machines and GitHub's runners come
# with kubectl; elsewhere the script says what to add instead of failing the other installs.
command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1 || missing+=(kubectl)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [[ " ${missing[*]} " == *" kubectl "* ]]; then
        if apt-cache policy kubectl 2>/dev/null | grep 'Candidate: [^(]' >/dev/null; then  # not -q: an early exit fails the pipe (pipefail)
            pkgs+=(kubectl)
        else
            echo "no apt source here carries kubectl (Debian's kubernetes-client is too old for deploy/k8s):" \
                "add the Kubernetes apt repository (https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/)" \
                "and run make setup again, or put kubectl >= 1.21 or kustomize >= 3.7 on PATH" >&2
        fi
    fi
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
else
    echo "bento-canary needs these system packages; please install them: sudo apt-get install ${missing[*]}" >&2
fi
