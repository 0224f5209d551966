# Sourced by test.sh and demo.sh: `need_pkgs PKG…` installs the Debian packages that are not
# installed (as root; otherwise it names them and exits 5), then checks that all of them are.
# Two rounds: installing one package can remove another that was there (a machine with
# qemu-utils from backports loses it to qemu-system-x86's bookworm qemu-block-extra).
need_pkgs() {
  local round p missing
  for round in 1 2 3; do
    missing=()
    for p in "$@"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [ "$round" = 3 ]; then
      echo "${0##*/}: still missing after apt-get install: ${missing[*]}" >&2
      exit 5
    fi
    if [ "$(id -u)" != 0 ]; then
      echo "${0##*/}: run as root, or install: ${missing[*]}" >&2
      exit 5
    fi
    if [ "$round" = 1 ]; then apt-get update -qq; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}"
  done
}
