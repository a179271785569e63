#!/bin/sh
# Set up what vmloader needs on this worker; safe to run again (fast when done).
#  - Debian packages (as root, only those missing)
#  - the libvirt daemons (no systemd here: started by hand when none runs)
#  - a venv at .venv with vmloader installed in editable mode
set -eu
cd "$(dirname "$0")/.."

PACKAGES="qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
debootstrap e2fsprogs fdisk ovmf mtools python3-venv python3-libvirt python3-pyinotify python3-requests python3-psutil
nginx-light squid xfsprogs"

missing=""
for pkg in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages:$missing — install them as root (apt-get install$missing)" >&2
    exit 1
  fi
  echo "setup: installing Debian packages:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

if [ "$(id -u)" = 0 ]; then
  if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "setup: starting virtlogd and libvirtd"
    [ -e /run/virtlogd.pid ] && kill -0 "$(cat /run/virtlogd.pid)" 2>/dev/null || virtlogd -d
    [ -e /run/libvirtd.pid ] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null || libvirtd -d
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  fi
fi

stamp=.venv/.vmloader-setup
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating the Python environment in .venv"
  python3 -m venv .venv
  # The packages as wheels, kept outside the clone (per user) under a key of what they are built
  # from: pyproject.toml, this Python, libvirt's headers (libvirt-python is built from source).
  # A fresh clone then installs without asking the index: about 11 s instead of 20.
  key=$({ cat pyproject.toml; python3 --version; dpkg-query -W -f='${Version}' libvirt-dev; } | sha256sum | cut -c1-16)
  wheels="${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/vmloader-setup/wheels-$key"
  if [ ! -d "$wheels" ] && mkdir -p "$(dirname "$wheels")" 2>/dev/null; then
    echo "setup: keeping the packages as wheels in $wheels"
    made=$(mktemp -d "$wheels.XXXXXX")
    if .venv/bin/pip wheel -q -w "$made" '.[test]' setuptools wheel; then
      rm -f "$made"/vmloader-*.whl                      # this checkout is installed from itself
      mv -T "$made" "$wheels" 2>/dev/null || rm -rf "$made"   # another setup kept them first
    else
      rm -rf "$made"
    fi
  fi
  if [ -d "$wheels" ] && .venv/bin/pip install -q --no-index --find-links "$wheels" -e '.[test]'; then
    :
  else
    [ -d "$wheels" ] && echo "setup: the wheels in $wheels did not install; installing from the index"
    .venv/bin/pip install -q -e '.[test]'
  fi
  echo "$want" > "$stamp"
fi
