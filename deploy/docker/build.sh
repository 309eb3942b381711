#!/usr/bin/env bash
# Builds the acs-relay container images from this checkout:
#
#   deploy/docker/build.sh [TAG]        # default TAG: dev
#
# 1. compiles relay-edge and relay-agent on the host as static binaries (glibc, +crt-static), so
#    the images need no base image, no libc and no network to build;
# 2. stages a small build context (binaries with debug info stripped, the image user, an empty
#    state directory);
# 3. runs `docker build --target edge|agent|tools` on deploy/docker/Dockerfile.
#
# Images: acs-relay-edge:TAG, acs-relay-agent:TAG, and acs-relay-tools:TAG (the sample bot and
# the simulated ACS caller, for the compose demo). DOCKER picks the client (default: docker
# on PATH); the Dockerfile has no `# syntax=` line, so no frontend image is pulled.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="${1:-dev}"
docker_cli="${DOCKER:-docker}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
context="target/docker-context"

echo "== static binaries for $triple"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which must stay dynamic.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$triple" \
    -p relay-edge -p relay-agent -p relay-bench

echo "== build context in $context"
rm -rf "$context"
mkdir -p "$context/bin" "$context/rootfs/etc" "$context/rootfs/state" "$context/rootfs/run"
for bin in relay-edge relay-agent relay-bench; do
    objcopy --strip-debug "target/$triple/release/$bin" "$context/bin/$bin"
done
# The unprivileged user (65532, as in distroless images) and nothing else.
printf 'root:x:0:0:root:/root:/sbin/nologin\nacs-relay:x:65532:65532:acs-relay:/var/lib/acs-relay:/sbin/nologin\n' \
    >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nacs-relay:x:65532:\n' >"$context/rootfs/etc/group"
chmod 0700 "$context/rootfs/state" "$context/rootfs/run"

for target in edge agent tools; do
    echo "== acs-relay-$target:$tag"
    DOCKER_BUILDKIT=1 "$docker_cli" build --quiet -f deploy/docker/Dockerfile --target "$target" \
        -t "acs-relay-$target:$tag" "$context" >/dev/null
    size="$("$docker_cli" image inspect --format '{{.Size}}' "acs-relay-$target:$tag")"
    echo "acs-relay-$target:$tag $((size / 1024 / 1024)) MiB"
done
