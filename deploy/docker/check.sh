#!/usr/bin/env bash
# Runs the images built by build.sh the way an operator would, with host networking, and relays
# ACS-shaped traffic through them: webhooks and media calls from `relay-bench load`, answered by
# `relay-bench bot` on the host. Exits non-zero, with both containers' logs, if anything is off.
#
#   deploy/docker/check.sh [TAG]          # default TAG: dev; needs a running Docker engine
#
# RELAY_BENCH names the relay-bench binary (default target/debug/relay-bench, which
# `cargo test --workspace` builds). DOCKER picks the client.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="${1:-dev}"
docker_cli="${DOCKER:-docker}"
bench="${RELAY_BENCH:-target/debug/relay-bench}"
run_id="acs-relay-check-$$"
work="$(mktemp -d)"
bot_pid=""

cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        for c in "$run_id-edge" "$run_id-agent"; do
            echo "---- logs of $c" >&2
            "$docker_cli" logs "$c" >&2 2>&1 || true
        done
    fi
    "$docker_cli" rm -f "$run_id-edge" "$run_id-agent" >/dev/null 2>&1 || true
    "$docker_cli" volume rm -f "$run_id-edge" "$run_id-agent" >/dev/null 2>&1 || true
    [ -n "$bot_pid" ] && kill "$bot_pid" 2>/dev/null || true
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

fail() {
    echo "check failed: $*" >&2
    exit 1
}

# Free loopback ports from the OS (the containers share the host's network).
read -r public tunnel edge_admin agent_admin < <(python3 -c '
import socket
socks = []
for _ in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", socks[1].getsockname()[1]))
print(*(s.getsockname()[1] for s in socks))')

echo "== the state directory belongs to the image's user, and nothing runs as root"
for image in edge agent; do
    user="$("$docker_cli" image inspect --format '{{.Config.User}}' "acs-relay-$image:$tag")"
    [ "$user" = "65532:65532" ] || fail "acs-relay-$image runs as '$user'"
    container="$("$docker_cli" create "acs-relay-$image:$tag")"
    owner="$("$docker_cli" export "$container" | tar --numeric-owner -tvf - var/lib/acs-relay/ | awk 'NR==1 {print $2}')"
    "$docker_cli" rm "$container" >/dev/null
    [ "$owner" = "65532/65532" ] || fail "acs-relay-$image: /var/lib/acs-relay is owned by $owner"
done

echo "== edge: initialise the state volume (twice: --if-missing), issue a token"
volume_edge=(-v "$run_id-edge:/var/lib/acs-relay")
"$docker_cli" run --rm "${volume_edge[@]}" "acs-relay-edge:$tag" init --if-missing --name localhost
"$docker_cli" run --rm "${volume_edge[@]}" "acs-relay-edge:$tag" init --if-missing --name localhost
token="$("$docker_cli" run --rm "${volume_edge[@]}" "acs-relay-edge:$tag" \
    pair --agent docker-check --edge-addr "127.0.0.1:$tunnel")"

# The load comes from one address at thousands of requests a second: no per-source limit.
echo "== edge: run (public 127.0.0.1:$public, tunnel 127.0.0.1:$tunnel udp+tcp)"
"$docker_cli" run -d --name "$run_id-edge" --network host "${volume_edge[@]}" \
    -e RELAY_EDGE_LISTEN="127.0.0.1:$public" \
    -e RELAY_EDGE_TUNNEL_LISTEN="127.0.0.1:$tunnel" \
    -e RELAY_EDGE_ADMIN_LISTEN="127.0.0.1:$edge_admin" \
    -e RELAY_EDGE_RATE_LIMIT_PER_SOURCE=0 \
    "acs-relay-edge:$tag" >/dev/null

echo "== bot on the host"
"$bench" bot --listen 127.0.0.1:0 >"$work/bot.log" 2>&1 &
bot_pid=$!
bot=""
for _ in $(seq 1 100); do
    bot="$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/bot.log" | head -1)"
    [ -n "$bot" ] && break
    sleep 0.1
done
[ -n "$bot" ] || fail "the bot did not start: $(cat "$work/bot.log")"

echo "== agent: pair over the tunnel, then run (edge by name: localhost)"
volume_agent=(-v "$run_id-agent:/var/lib/acs-relay")
"$docker_cli" run --rm --network host "${volume_agent[@]}" "acs-relay-agent:$tag" pair --token "$token"
"$docker_cli" run -d --name "$run_id-agent" --network host "${volume_agent[@]}" \
    -e RELAY_AGENT_UPSTREAM="http://$bot" \
    -e RELAY_AGENT_EDGE="localhost:$tunnel" \
    -e RELAY_AGENT_ADMIN_LISTEN="127.0.0.1:$agent_admin" \
    "acs-relay-agent:$tag" >/dev/null

echo "== both ready (their own health checks, run in the containers)"
ready=""
for _ in $(seq 1 100); do
    if "$docker_cli" exec "$run_id-edge" /usr/local/bin/relay-edge health --ready >/dev/null 2>&1 &&
        "$docker_cli" exec "$run_id-agent" /usr/local/bin/relay-agent health --ready >/dev/null 2>&1; then
        ready=yes
        break
    fi
    sleep 0.2
done
[ -n "$ready" ] || fail "edge and agent did not become ready"

echo "== webhooks and media calls through the containers"
"$bench" load --target "127.0.0.1:$public" --calls 3 --duration 3s --callbacks-per-call 2 \
    --webhook-concurrency 4 --webhook-duration 2s --json "$work/load.json" >/dev/null
python3 - "$work/load.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
media, hooks = report["media"], report["webhooks"]
problems = []
if media["calls_connected"] != 3: problems.append(f"calls connected: {media['calls_connected']}")
if media["frames_sent"] != 3 * 150: problems.append(f"frames sent: {media['frames_sent']}")
if media["frames_lost"] or media["frames_corrupt"]: problems.append(f"media: {media}")
if media["callbacks_ok"] != 6: problems.append(f"callbacks ok: {media['callbacks_ok']}")
if hooks["failed"] or not hooks["ok"]: problems.append(f"webhooks: {hooks}")
if problems:
    sys.exit("through the containers: " + "; ".join(problems))
print(f"relayed {media['frames_sent']} media frames and {hooks['ok'] + media['callbacks_ok']} webhooks, none lost")
EOF
echo "== ok"
