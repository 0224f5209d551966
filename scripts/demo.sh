#!/usr/bin/env bash
# Kiln's main job, end to end on this machine: build examples/hello (FROM kiln/busybox, made
# here from Debian's busybox-static, no container registry) on the namespace builder, snapshot
# it as an ext4 root disk, register it as `hello`, and describe it. Needs root (namespaces,
# overlayfs). State goes to $KILN_HOME (default: target/demo-home).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for p in busybox-static e2fsprogs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}"
fi

cargo build --release -q
export KILN_HOME="${KILN_HOME:-$PWD/target/demo-home}"
kiln=target/release/kiln
"$kiln" lower examples/multistage --target test --build-arg DEBIAN=bookworm >/dev/null
"$kiln" image create examples/hello --disk_mb 256
"$kiln" image describe hello
disk=$("$kiln" image describe hello --json | sed -n 's/.*"snapshot_uri":"file:\/\/\([^"]*\)".*/\1/p')
e2fsck -fn "$disk" >/dev/null && echo "e2fsck: $disk is clean"
debugfs -R "cat /srv/hello.txt" "$disk" 2>/dev/null
