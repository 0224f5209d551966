#!/usr/bin/env bash
# Kiln's whole test suite, as CI runs it (`.ci/run` calls this and nothing else):
# system packages the tests need, format and lint checks, every test, and a fuzz smoke run.
# Needs ../shared (BuildKit's conformance data) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages. Nothing beyond Rust is needed yet; later suites add theirs here.
need_pkgs=()
if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
  else
    echo "test.sh: run as root (or install: ${need_pkgs[*]})" >&2
    exit 5
  fi
fi

if [ ! -f ../shared/conformance/buildkit/README.md ] && [ -z "${KILN_CONFORMANCE_DIR:-}" ]; then
  echo "test.sh: ../shared/conformance/buildkit is missing: clone kiln beside shared/" >&2
  exit 5
fi

command -v cargo-clippy >/dev/null && cargo fmt --version >/dev/null || { echo "test.sh: needs rustfmt and clippy (rustup component add rustfmt clippy)" >&2; exit 5; }
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
cargo xtask fuzz --smoke
