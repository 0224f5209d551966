#!/usr/bin/env bash
# Kiln's main job, end to end on this machine: build examples/python-app (FROM
# kiln/debian:bookworm, made here with mmdebstrap the first time, no container registry; its RUN
# step installs python3 from the Debian mirror) on the namespace builder, snapshot it as an ext4
# root disk, register it as `python-app`, then launch a sandbox from that name and run the app.
# Needs root (namespaces, overlayfs, loop mounts). State goes to $KILN_HOME (default:
# target/demo-home).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/need-pkgs.sh
need_pkgs busybox-static e2fsprogs mmdebstrap util-linux mount

cargo build --release -q --bin kiln
export KILN_HOME="${KILN_HOME:-$PWD/target/demo-home}"
kiln=target/release/kiln
"$kiln" image create examples/python-app
"$kiln" image ls
"$kiln" image describe python-app
disk=$("$kiln" image describe python-app --json | sed -n 's/.*"snapshot_uri":"file:\/\/\([^"]*\)".*/\1/p')
e2fsck -fn "$disk" >/dev/null && echo "e2fsck: $disk is clean"
# The image's CMD, WORKDIR and ENV, in a copy-on-write sandbox of the snapshot:
"$kiln" sbx run --image python-app
"$kiln" sbx run --image python-app -- sh -c 'echo "in $(pwd) as $(id -un): $APP_GREETING"'
