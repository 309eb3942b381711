#!/usr/bin/env bash
# Brings the compose demo up from the images build.sh made, drives the simulated ACS caller
# through it, checks that the edge's side cannot reach the bot (nor the bot's side the edge), and
# takes it down. Exits non-zero, with the services' logs, if anything is off.
#
#   deploy/compose/check.sh [TAG]     # default TAG: dev; needs docker-compose and an engine
set -euo pipefail
cd "$(dirname "$0")/../.."

export ACS_RELAY_TAG="${1:-dev}"
docker_cli="${DOCKER:-docker}"
project="acs-relay-check-$$"
compose=(docker-compose -p "$project" -f deploy/compose/docker-compose.yml)

cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        "${compose[@]}" logs --no-color >&2 || true
    fi
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    exit "$status"
}
trap cleanup EXIT

fail() {
    echo "compose check failed: $*" >&2
    exit 1
}

echo "== up"
"${compose[@]}" up -d --quiet-pull 2>&1 | grep -v '^Creating\|^Starting' || true
healthy=""
for _ in $(seq 1 100); do
    if "${compose[@]}" ps agent | grep -q '(healthy)'; then
        healthy=yes
        break
    fi
    sleep 0.3
done
[ -n "$healthy" ] || fail "the agent did not become healthy (connected to the edge)"

echo "== a simulated ACS caller through the edge"
"${compose[@]}" run --rm --no-deps caller

echo "== the networks keep the edge's side and the bot apart"
for pair in "tunnel bot" "public bot" "private edge"; do
    set -- $pair
    if "$docker_cli" run --rm --network "${project}_$1" "acs-relay-tools:$ACS_RELAY_TAG" \
        load --target "$2:8080" --calls 1 --duration 1s >/dev/null 2>&1; then
        fail "from the $1 network, $2 is reachable"
    fi
done
echo "== ok"
