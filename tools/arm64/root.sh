#!/usr/bin/env bash
# Build (once) and cache an arm64 Debian bookworm root for checking the device
# side of edge-sdk on the Jetson CPU architecture, by user-mode emulation.
#
#   tools/arm64/root.sh            # build build/arm64-root if it is not cached yet
#   ARM64_ROOT=/some/dir tools/arm64/root.sh
#
# How it works (see also tools/arm64/README.md):
#  * qemu: bookworm's qemu-user-static is 7.2, whose emulated programs read the
#    HOST's /proc/cpuinfo (x86 flags), so devices.detect() would report an x86
#    CPU.  QEMU >= 8.1 emulates /proc/cpuinfo for aarch64 (Features follow
#    QEMU_CPU).  When the host's qemu is older, the static qemu-aarch64 of
#    bookworm-backports' qemu-user package is downloaded with apt (signatures
#    checked, private apt state, nothing installed on the host) and unpacked to
#    build/arm64-qemu/.  `tools/arm64/root.sh --qemu` prints the one in use.
#  * that qemu-aarch64 is registered with the kernel's binfmt_misc with the
#    F ("fix binary") flag, so the kernel opens the interpreter once at
#    registration and arm64 ELF files then run transparently, also inside a
#    chroot that has no qemu binary of its own.
#  * debootstrap --arch=arm64 builds a minimal bookworm root with Debian's
#    python3 (3.11), python3-venv, CA certificates (for PyPI) and python3-opencv (the system OpenCV
#    with GStreamer that the device install keeps, as JetPack's is kept on a Jetson).
#  * A marker file records a finished build; delete build/arm64-root (as root)
#    or run `make verify-arm64-clean` to rebuild.
#
# If binfmt_misc cannot be used here (no permission to mount or register),
# the script falls back to `debootstrap --foreign` (first stage only: it
# unpacks packages and runs nothing of the target) and unpacks python3 and its
# dependencies with dpkg-deb; run.sh then runs python under
# `qemu-aarch64-static -L <root>` explicitly (see run.sh, "no-binfmt mode").
set -euo pipefail
cd "$(dirname "$0")/../.."  # relative paths below are from the repository root

ROOT=${ARM64_ROOT:-build/arm64-root}
SUITE=${ARM64_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MARKER="$ROOT/.edge-sdk-root"
QEMU_DIR=${ARM64_QEMU_DIR:-build/arm64-qemu}
PKGS="python3,python3-venv,python3-pip-whl,python3-setuptools-whl,ca-certificates,python3-opencv"

log() { printf '[arm64-root] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (debootstrap, chroot, binfmt_misc): run as root or via sudo"
    exit 1
  fi
}

ensure_host_tools() {
  local missing=()
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
  command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing host tools: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

# "major minor" of a qemu-user binary.
qemu_version() {
  "$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p'
}

# Prints the absolute path of a qemu-aarch64 (>= 8.1) to use, fetching one if needed.
qemu_path() {
  local host major minor
  host=$(command -v qemu-aarch64-static || true)
  if [ -n "$host" ]; then
    read -r major minor <<<"$(qemu_version "$host")"
    if [ "${major:-0}" -gt 8 ] || { [ "${major:-0}" -eq 8 ] && [ "${minor:-0}" -ge 1 ]; }; then
      echo "$host"; return 0
    fi
  fi
  local cached
  cached="$(cd "$(dirname "$QEMU_DIR")" && pwd)/$(basename "$QEMU_DIR")/usr/bin/qemu-aarch64"
  if [ -x "$cached" ]; then echo "$cached"; return 0; fi
  log "host qemu-aarch64-static is ${major:-?}.${minor:-?} (host /proc/cpuinfo leaks into the guest):"
  log "fetching qemu-user from bookworm-backports into $QEMU_DIR"
  local apt="$QEMU_DIR/apt"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE-backports main" \
    > "$apt/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$PWD/$apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
              -o "Dir::State::Lists=$PWD/$apt/lists" -o "Dir::Cache=$PWD/$apt/cache"
              -o "APT::Sandbox::User=root")
  apt-get -qq "${opts[@]}" update >&2
  (cd "$apt/debs" && apt-get -qq "${opts[@]}" download "qemu-user/$SUITE-backports" >&2)
  dpkg-deb -x "$apt"/debs/qemu-user_*.deb "$QEMU_DIR/unpacked"
  mkdir -p "$QEMU_DIR/usr/bin"
  cp "$QEMU_DIR/unpacked/usr/bin/qemu-aarch64" "$cached.tmp"
  rm -rf "$QEMU_DIR/unpacked" "$apt/debs"
  mv "$cached.tmp" "$cached"
  log "using $("$cached" --version | head -1)"
  echo "$cached"
}

# Succeeds when arm64 binaries run transparently (binfmt_misc + qemu, F flag).
# Safe to call repeatedly; prints nothing on success.
ensure_binfmt() {
  local bm=/proc/sys/fs/binfmt_misc
  local qemu=$1
  if [ ! -e "$bm/register" ]; then
    mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null || return 1
  fi
  [ -e "$bm/register" ] || return 1
  if [ -e "$bm/qemu-aarch64" ]; then
    # Registered already (by us, update-binfmts or systemd-binfmt).  Without
    # the F flag the interpreter path must resolve inside the chroot, which an
    # empty root does not have; another qemu may be too old: re-register ours.
    if grep -q '^enabled' "$bm/qemu-aarch64" && grep -q '^flags:.*F' "$bm/qemu-aarch64" \
        && grep -qx "interpreter $qemu" "$bm/qemu-aarch64"; then
      return 0
    fi
    echo -1 > "$bm/qemu-aarch64" 2>/dev/null || return 1
  fi
  # Magic and mask as in Debian's /usr/lib/binfmt.d/qemu-aarch64.conf.
  printf '%s' ":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:${qemu}:F" \
    > "$bm/register" 2>/dev/null || return 1
  grep -q '^enabled' "$bm/qemu-aarch64" 2>/dev/null
}

build_with_binfmt() {
  log "debootstrap --arch=arm64 $SUITE into $ROOT (binfmt_misc mode; ~10-20 min under emulation)"
  debootstrap --arch=arm64 --variant=minbase --include="$PKGS" \
    "$SUITE" "$ROOT" "$MIRROR"
  # Name resolution for pip inside the chroot.
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  chroot "$ROOT" /usr/bin/python3 -c 'import platform, sys; print("arm64 root python", sys.version.split()[0], platform.machine())'
  echo "mode=binfmt" > "$MARKER"
}

build_foreign() {
  log "no binfmt_misc (unavailable, or ARM64_NO_BINFMT=1): debootstrap --foreign (first stage only) into $ROOT"
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$PKGS" \
    "$SUITE" "$ROOT" "$MIRROR"
  # The second stage would run arm64 maintainer scripts, impossible without
  # binfmt_misc: unpack every downloaded package instead (python does not need
  # its maintainer scripts to run).
  local deb
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$ROOT"
  done
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3.11" -c 'import platform, sys; print("arm64 root python", sys.version.split()[0], platform.machine())'
  echo "mode=qemu-L" > "$MARKER"
}

main() {
  if [ "${1:-}" = --qemu ]; then qemu_path; return 0; fi
  if [ -f "$MARKER" ]; then
    if grep -q mode=binfmt "$MARKER"; then
      need_root
      QEMU=$(qemu_path)
      ensure_binfmt "$QEMU" || { log "root was built with binfmt_misc, which is unavailable now"; exit 1; }
    fi
    log "cached: $ROOT ($(cat "$MARKER"))"
    return 0
  fi
  need_root
  ensure_host_tools
  if [ -e "$ROOT" ]; then
    log "removing unfinished $ROOT"
    umount -R "$ROOT/proc" "$ROOT/dev" "$ROOT/sys" 2>/dev/null || true
    rm -rf --one-file-system "$ROOT"
  fi
  mkdir -p "$ROOT"
  local t0=$SECONDS
  QEMU=$(qemu_path)
  if [ "${ARM64_NO_BINFMT:-0}" != 1 ] && ensure_binfmt "$QEMU"; then
    build_with_binfmt
  else
    build_foreign
  fi
  log "root ready in $((SECONDS - t0)) s"
}

main "$@"
