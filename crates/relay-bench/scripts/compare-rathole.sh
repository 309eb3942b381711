#!/usr/bin/env bash
# Runs the same call load through rathole (plain TCP and TLS transports) as `relay-bench compare`
# runs direct and through acs-relay, so the README's table has all three measured on one machine.
# Not run in CI: it installs rathole (and OpenSSL headers, which its TLS build needs) from the
# network. Usage, from the workspace root:
#
#   crates/relay-bench/scripts/compare-rathole.sh [CALLS] [DURATION] [WEBHOOK_DURATION]
#
# Everything listens on 127.0.0.1; temporary files go to a directory removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../../.."

CALLS="${1:-200}"
DURATION="${2:-20s}"
WEBHOOK_DURATION="${3:-10s}"
ROOT="${RATHOLE_ROOT:-$HOME/.cache/acs-relay-bench/rathole}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -x "$ROOT/bin/rathole" ]; then
    if ! pkg-config --exists openssl 2>/dev/null; then
        sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
        sudo_if_needed apt-get install -y -q libssl-dev pkg-config
    fi
    # Not --locked: rathole 0.5.0's lock file pins a `time` release that no longer compiles.
    cargo install rathole --root "$ROOT"
fi
cargo build --release -q -p relay-bench
BENCH=target/release/relay-bench

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BENCH" bot --listen 127.0.0.1:0 > "$WORK/bot.out" &
PIDS+=($!)
BOT_PID=$!
for _ in $(seq 1 100); do grep -q listening "$WORK/bot.out" && break; sleep 0.1; done
BOT_ADDR="$(awk '{print $3}' "$WORK/bot.out")"

# A self-signed certificate for rathole's TLS transport.
openssl req -x509 -newkey rsa:2048 -nodes -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 2>/dev/null
openssl pkcs12 -export -out "$WORK/identity.pfx" -inkey "$WORK/key.pem" -in "$WORK/cert.pem" -passout pass:bench

run_rathole() {
    local transport="$1" tunnel public
    tunnel="$(free_port)"
    public="$(free_port)"
    local tls_server="" tls_client=""
    if [ "$transport" = tls ]; then
        tls_server="$(printf '[server.transport.tls]\npkcs12 = "%s/identity.pfx"\npkcs12_password = "bench"' "$WORK")"
        tls_client="$(printf '[client.transport.tls]\ntrusted_root = "%s/cert.pem"\nhostname = "localhost"' "$WORK")"
    fi
    cat > "$WORK/server-$transport.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$tunnel"
[server.transport]
type = "$transport"
[server.transport.tcp]
nodelay = true
$tls_server
[server.services.bot]
token = "bench"
bind_addr = "127.0.0.1:$public"
nodelay = true
EOF
    cat > "$WORK/client-$transport.toml" <<EOF
[client]
remote_addr = "localhost:$tunnel"
[client.transport]
type = "$transport"
[client.transport.tcp]
nodelay = true
$tls_client
[client.services.bot]
token = "bench"
local_addr = "$BOT_ADDR"
nodelay = true
EOF
    RUST_LOG=warn "$ROOT/bin/rathole" "$WORK/server-$transport.toml" > "$WORK/server-$transport.log" 2>&1 &
    local server=$!
    PIDS+=($server)
    RUST_LOG=warn "$ROOT/bin/rathole" "$WORK/client-$transport.toml" > "$WORK/client-$transport.log" 2>&1 &
    local client=$!
    PIDS+=($client)
    local ready=""
    for _ in $(seq 1 100); do
        if python3 -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$public/api/callbacks/ready', data=b'{}'), timeout=1)" 2>/dev/null; then
            ready=yes
            break
        fi
        sleep 0.1
    done
    if [ -z "$ready" ]; then
        echo "rathole over $transport did not come up:" >&2
        cat "$WORK/server-$transport.log" "$WORK/client-$transport.log" >&2
        return 1
    fi
    echo "== rathole over $transport"
    "$BENCH" load --target "127.0.0.1:$public" --calls "$CALLS" --duration "$DURATION" \
        --webhook-duration "$WEBHOOK_DURATION" \
        --pid "rathole-server=$server" --pid "rathole-client=$client" --pid "bot=$BOT_PID" \
        --json "$WORK/rathole-$transport.json"
    kill "$server" "$client" 2>/dev/null || true
}

run_rathole tcp
run_rathole tls
kill "$BOT_PID" 2>/dev/null || true

echo "== direct and acs-relay"
"$BENCH" compare --calls "$CALLS" --duration "$DURATION" --webhook-duration "$WEBHOOK_DURATION"
