#!/usr/bin/env bash
# Screenshots of Locust's web UI during a real run against the running stack (`canary up`):
#   bash loadtest/screenshot.sh [OUT.png]        (default docs/img/locust-webui.png)
# Starts `canary loadtest` (the web UI, on a free port), starts a test through the UI's own
# /swarm endpoint (what its Start button posts), lets it run, then has headless Chromium
# capture the statistics tab (OUT.png: every request named by protocol, slot and model
# version), the charts tab (OUT-charts.png) and the accuracy tab (OUT-accuracy.png), and
# stops Locust. Knobs: USERS (24),
# SPAWN_RATE (8), RUN_S (40), and LOADTEST_ARGS for `canary loadtest` (e.g. "--slot green").
# Needs Chromium, which the project does not otherwise use: `apt-get install chromium`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/img/locust-webui.png}
charts=${out%.png}-charts.png
accuracy=${out%.png}-accuracy.png
users=${USERS:-24}
rate=${SPAWN_RATE:-8}
run_s=${RUN_S:-40}
bin=.venv/bin
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "error: no chromium on PATH (apt-get install chromium)" >&2; exit 1; }
port=$($bin/python -c 'from deploy.process import free_port; print(free_port())')
url="http://127.0.0.1:$port"

# shellcheck disable=SC2086  # LOADTEST_ARGS is a list of options
$bin/canary loadtest --web-port "$port" --users "$users" --spawn-rate "$rate" ${LOADTEST_ARGS:-} &
locust=$!
trap 'kill -TERM $locust 2>/dev/null || true; wait $locust 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf -o /dev/null "$url/" && break
    kill -0 $locust 2>/dev/null || { echo "error: canary loadtest exited" >&2; exit 1; }
    sleep 0.5
done
curl -sf -o /dev/null -X POST --data "user_count=$users&spawn_rate=$rate" "$url/swarm"
echo "load running: $users users; screenshots in ${run_s}s"
sleep "$run_s"
mkdir -p "$(dirname "$out")"
shoot() {  # url, file; a short virtual-time budget: the page renders, but polls only a few times
    nice -n 10 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,900 \
        --virtual-time-budget=3000 --screenshot="$2" "$1" 2>/dev/null
}
# the charts first: Chromium itself takes CPU from the run, which the later shots' charts would show
shoot "$url/?tab=charts" "$charts"
shoot "$url/?tab=stats" "$out"
shoot "$url/?tab=accuracy" "$accuracy"
echo "screenshots: $out $charts $accuracy"
