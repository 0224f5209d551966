#!/usr/bin/env bash
# Kiln's whole test suite, as CI runs it (`.ci/run` calls this and nothing else):
# system packages the tests need, format and lint checks, every test, and a fuzz smoke run.
# Needs ../shared (BuildKit's conformance data) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use (they fail loudly when one is missing; this installs them).
. scripts/need-pkgs.sh
need_pkgs golang-go git golang-github-moby-patternmatcher-dev e2fsprogs mmdebstrap util-linux mount \
  tar busybox-static file xxd docker-registry skopeo umoci apache2-utils openssl buildah \
  qemu-system-x86 qemu-utils linux-image-cloud-amd64

if [ ! -f ../shared/conformance/buildkit/README.md ] && [ -z "${KILN_CONFORMANCE_DIR:-}" ]; then
  echo "test.sh: ../shared/conformance/buildkit is missing: clone kiln beside shared/" >&2
  exit 5
fi

command -v cargo-clippy >/dev/null && cargo fmt --version >/dev/null || { echo "test.sh: needs rustfmt and clippy (rustup component add rustfmt clippy)" >&2; exit 5; }
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
cargo xtask fuzz --smoke
