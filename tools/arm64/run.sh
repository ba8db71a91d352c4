#!/usr/bin/env bash
# Check the device side of edge-sdk on Arm64 (the CPU of NVIDIA Jetson) by emulation:
# install the project (no extras: what a device gets) into the cached arm64 Debian root and
# run demo/verify_device.py on the demo's int8 packages, once per emulated CPU model.
#
#   tools/arm64/run.sh
#
# Environment:
#   ARM64_CPUS      QEMU_CPU models to run under (default "max,sve=off,sme=off cortex-a57"):
#                   "max" has the Arm int8 dot product (asimddp) and i8mm; cortex-a57 (Jetson
#                   Nano/TX1/TX2) is ARMv8.0 without them, so both onnxruntime kernel families
#                   run.  SVE and SME are switched off in "max": emulated, they make onnxruntime's
#                   fp32 kernels ~10x slower (110 s per 224x224 image), and no Jetson CPU has them.
#                   cortex-a76 is the closest model to Jetson Orin's Cortex-A78AE (dot product,
#                   no i8mm).
#   VERIFY_SAMPLES  held-out inputs per package (default 16; `make verify-arm64` uses 10)
#   VERIFY_ARGS     more demo.verify_device arguments (e.g. --require-int8 --fp32-twin)
#   ARM64_SERIAL=1  run the CPU passes one after another with all cores (default: all at once,
#                   cores split between them)
#   DEMO_BUILD      the demo build directory (default build/demo)
#   ARM64_ROOT      the arm64 root (default build/arm64-root; see tools/arm64/root.sh)
# Logs: build/arm64-verify/<cpu>.log; exit status non-zero when any pass fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOT=${ARM64_ROOT:-build/arm64-root}
BUILD=${DEMO_BUILD:-build/demo}
CPUS=${ARM64_CPUS:-max,sve=off,sme=off cortex-a57}
SAMPLES=${VERIFY_SAMPLES:-16}
EXTRA=${VERIFY_ARGS:-}          # more demo.verify_device arguments, e.g. --require-int8
LOGS=build/arm64-verify
GUEST=/opt/edge-sdk            # inside the root
STAGE="$ROOT$GUEST"

log() { printf '[arm64] %s\n' "$*" >&2; }

if ! ls "$BUILD"/packages/*.int8.edgepkg >/dev/null 2>&1; then
  log "no $BUILD/packages/*.int8.edgepkg: run \`make demo\` first"
  exit 2
fi

t0=$SECONDS
tools/arm64/root.sh
MODE=$(sed -n 's/^mode=//p' "$ROOT/.edge-sdk-root")
QEMU=$(tools/arm64/root.sh --qemu)
log "root $ROOT ($MODE), $("$QEMU" --version | head -1)"

# --- stage the project and the inputs inside the root ---------------------------------------
# The project as the working tree has it (tracked and untracked, not ignored files), so the
# install comes from its own pyproject.toml; the check runs from a directory holding only
# demo/verify_device.py, so edge_sdk, runtime and devices are imported from the install.
rm -rf "$STAGE/src" "$STAGE/check"
GB=build/demo                  # the demo build as the check sees it, under $GUEST/check
mkdir -p "$STAGE/src" "$STAGE/check/demo" "$STAGE/check/$GB/image/data" "$STAGE/check/$GB/text/data"
git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
  | tar -xf - -C "$STAGE/src"
cp demo/__init__.py demo/verify_device.py "$STAGE/check/demo/"
link_copy() {  # hard links when on one filesystem; a missing input is left to the check to report
  [ -e "$1" ] || return 0
  cp -al "$1" "$2" 2>/dev/null || cp -a "$1" "$2"
}
link_copy "$BUILD/packages" "$STAGE/check/$GB/packages"
link_copy "$BUILD/image/data/test" "$STAGE/check/$GB/image/data/test"
link_copy "$BUILD/text/data/test.tsv" "$STAGE/check/$GB/text/data/test.tsv"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# pip in the root trusts what the host trusts (a network that intercepts TLS adds its own CA
# to the host's bundle; the root's Debian bundle would refuse PyPI there).
cp -L /etc/ssl/certs/ca-certificates.crt "$STAGE/host-ca-certificates.crt" 2>/dev/null || true
mkdir -p "$LOGS"

status=0
if [ "$MODE" = binfmt ]; then
  # --- chroot: arm64 binaries run through binfmt_misc -------------------------------------
  mounted=()
  cleanup() {
    local i
    kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
    for ((i=${#mounted[@]}-1; i>=0; i--)); do umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true; done
  }
  trap cleanup EXIT
  mountpoint -q "$ROOT/proc" || { mount -t proc proc "$ROOT/proc"; mounted+=("$ROOT/proc"); }
  mountpoint -q "$ROOT/dev" || { mount --bind /dev "$ROOT/dev"; mounted+=("$ROOT/dev"); }
  mountpoint -q "$ROOT/sys" || { mount -t sysfs sysfs "$ROOT/sys" 2>/dev/null || mount --bind /sys "$ROOT/sys"; mounted+=("$ROOT/sys"); }
  cert=
  [ -s "$STAGE/host-ca-certificates.crt" ] && cert="$GUEST/host-ca-certificates.crt"
  guest() {  # guest QEMU_CPU command...
    local cpu=$1; shift
    chroot "$ROOT" /usr/bin/env -i QEMU_CPU="$cpu" HOME=/root LANG=C.UTF-8 PATH=/usr/bin:/bin \
      PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
      ${cert:+PIP_CERT=$cert} "$@"
  }
  if [ ! -x "$STAGE/venv/bin/python" ]; then
    log "creating the venv with Debian's python3 (arm64), seeing the system's OpenCV as on a Jetson"
    guest max /usr/bin/python3 -m venv --system-site-packages "$GUEST/venv"
  fi
  t1=$SECONDS
  log "pip install $GUEST/src (the project, no extras; dependencies from its pyproject.toml)"
  guest max "$GUEST/venv/bin/pip" uninstall -q -y edge-sdk >/dev/null 2>&1 || true
  guest max "$GUEST/venv/bin/pip" install -q "$GUEST/src"
  guest max "$GUEST/venv/bin/pip" list --format=freeze 2>/dev/null | tr '\n' ' ' | sed 's/^/[arm64] installed: /'; echo
  log "install took $((SECONDS - t1)) s"
  check() {  # check QEMU_CPU threads
    guest "$1" /bin/sh -c "cd $GUEST/check && exec $GUEST/venv/bin/python -m demo.verify_device \
      --build $GB --samples $SAMPLES --threads $2 $EXTRA"
  }
else
  # --- no binfmt_misc: qemu-aarch64 -L <root> runs Debian's arm64 python explicitly ---------
  # Nothing arm64 can start a subprocess here, so pip runs on the host: it builds the project's
  # wheel (from its pyproject.toml) and installs it with its declared dependencies as aarch64
  # cp311 wheels into a --target directory inside the root.
  t1=$SECONDS
  abs_root=$(cd "$ROOT" && pwd)
  site="$STAGE/site"
  rm -rf "$site" "$STAGE/wheel"
  python3 -m pip wheel -qq --no-deps -w "$STAGE/wheel" "$STAGE/src"
  plats=()
  for v in 17 24 27 28 31 34 35 36; do plats+=(--platform "manylinux_2_${v}_aarch64"); done
  python3 -m pip install -qq --target "$site" "${plats[@]}" --platform manylinux2014_aarch64 \
    --implementation cp --python-version 3.11 --abi cp311 --only-binary=:all: "$STAGE"/wheel/*.whl
  log "install took $((SECONDS - t1)) s"
  check() {  # check QEMU_CPU threads
    (cd "$STAGE/check" && exec env -i QEMU_CPU="$1" HOME=/root LANG=C.UTF-8 PATH=/usr/bin:/bin \
      PYTHONPATH="$GUEST/site" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
      "$QEMU" -L "$abs_root" "$abs_root/usr/bin/python3.11" -m demo.verify_device \
      --build "$GB" --samples "$SAMPLES" --threads "$2" $EXTRA)
  }
fi

# --- one pass per CPU model, all at once (each single-threaded: emulation leaves most of a ------
# 2-thread pool idle, and loading a package is single-threaded anyway); the first pass is shown
# live, the others when they end.
cpus=($CPUS)
threads=$(( $(nproc) / ${#cpus[@]} )); [ "$threads" -ge 1 ] || threads=1
[ "${ARM64_SERIAL:-0}" = 1 ] && threads=$(nproc)
t1=$SECONDS
pids=() logs=()
for i in "${!cpus[@]}"; do
  cpu=${cpus[i]}
  logs[i]="$LOGS/${cpu//[^A-Za-z0-9_-]/_}.log"
  log "QEMU_CPU=$cpu: python -m demo.verify_device --build $GB --samples $SAMPLES --threads $threads $EXTRA"
  if [ "$i" = 0 ] || [ "${ARM64_SERIAL:-0}" = 1 ]; then
    { check "$cpu" "$threads" 2>&1 | tee "${logs[i]}"; } &
  else
    check "$cpu" "$threads" > "${logs[i]}" 2>&1 &
  fi
  pids[i]=$!
  if [ "${ARM64_SERIAL:-0}" = 1 ]; then wait "${pids[i]}" && rc=0 || rc=$?; pids[i]=; rcs[i]=$rc; fi
done
status=0
for i in "${!cpus[@]}"; do
  if [ -n "${pids[i]}" ]; then wait "${pids[i]}" && rcs[i]=0 || rcs[i]=$?; fi
  if [ "$i" != 0 ] && [ "${ARM64_SERIAL:-0}" != 1 ]; then
    log "---- QEMU_CPU=${cpus[i]} (${logs[i]}) ----"
    cat "${logs[i]}"
  fi
done
for i in "${!cpus[@]}"; do
  log "QEMU_CPU=${cpus[i]}: exit ${rcs[i]} (log ${logs[i]})"
  [ "${rcs[i]}" = 0 ] || status=1
done
log "checks took $((SECONDS - t1)) s"
log "done in $((SECONDS - t0)) s; $( [ $status = 0 ] && echo PASSED || echo FAILED ) on: $CPUS"
exit $status
