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
#
# The images are linux/amd64 whatever the host (Azure Container Apps runs nothing else, and an
# arm64 laptop would otherwise build images Azure cannot start). On an x86_64 Linux host the
# binaries are compiled here; elsewhere with cargo-zigbuild when installed, else inside a
# linux/amd64 Rust container (RUST_IMAGE, default rust:1-bookworm; slow under emulation).
# BuildKit is used where the Docker CLI has it (buildx), the classic builder elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="${1:-dev}"
docker_cli="${DOCKER:-docker}"
triple="x86_64-unknown-linux-gnu"
host="$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')"
context="target/docker-context"
packages=(-p relay-edge -p relay-agent -p relay-bench)

echo "== static binaries for $triple (host: ${host:-no Rust toolchain})"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which must stay dynamic.
if [ "$host" = "$triple" ]; then
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$triple" "${packages[@]}"
elif command -v cargo-zigbuild >/dev/null 2>&1; then
    rustup target add "$triple"
    RUSTFLAGS="-C target-feature=+crt-static" cargo zigbuild --release --locked --target "$triple" "${packages[@]}"
else
    "$docker_cli" run --rm --platform linux/amd64 -v "$PWD:/src" -w /src "${RUST_IMAGE:-rust:1-bookworm}" \
        sh -c "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target $triple ${packages[*]}"
fi

# BuildKit only where this Docker CLI has it: forcing it on a CLI without buildx is an error.
if "$docker_cli" buildx version >/dev/null 2>&1; then buildkit=1; else buildkit=0; fi

echo "== build context in $context"
rm -rf "$context"
mkdir -p "$context/bin" "$context/rootfs/etc" "$context/rootfs/state" "$context/rootfs/run"
for bin in relay-edge relay-agent relay-bench; do
    if command -v objcopy >/dev/null 2>&1; then
        objcopy --strip-debug "target/$triple/release/$bin" "$context/bin/$bin"
    else
        cp "target/$triple/release/$bin" "$context/bin/$bin"
    fi
done
# The unprivileged user (65532, as in distroless images) and nothing else.
printf 'root:x:0:0:root:/root:/sbin/nologin\nacs-relay:x:65532:65532:acs-relay:/var/lib/acs-relay:/sbin/nologin\n' \
    >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nacs-relay:x:65532:\n' >"$context/rootfs/etc/group"
chmod 0700 "$context/rootfs/state" "$context/rootfs/run"

for target in edge agent tools; do
    echo "== acs-relay-$target:$tag"
    DOCKER_BUILDKIT="$buildkit" "$docker_cli" build --quiet --platform linux/amd64 \
        -f deploy/docker/Dockerfile --target "$target" -t "acs-relay-$target:$tag" "$context" >/dev/null
    size="$("$docker_cli" image inspect --format '{{.Size}}' "acs-relay-$target:$tag")"
    echo "acs-relay-$target:$tag $((size / 1024 / 1024)) MiB"
done
