#!/bin/sh
# Bake vmloader's agent into an image: run as root in the image's build (Packer, kickstart, a
# chroot, a debootstrap tree), from the directory `vmloader images agent-kit DIR` wrote.
#   sh DIR/install.sh [ROOT]     (ROOT: the image's root directory, default /)
# Installs the agent bundle and adopt.sh into ROOT/usr/lib/vmloader and enables a systemd unit
# that starts the agent at boot; needs no running systemd (the unit is enabled by its link).
set -eu
kit=$(cd "$(dirname "$0")" && pwd)
root=${1:-/}
for f in vmloader-agent.zip adopt.sh vmloader-adopt.service; do
  [ -f "$kit/$f" ] || { echo "install.sh: $kit/$f is missing: write the kit again with vmloader images agent-kit" >&2; exit 2; }
done
[ -d "$root/etc" ] || { echo "install.sh: $root does not look like an image's root (no etc/)" >&2; exit 2; }
install -d -m 755 "$root/usr/lib/vmloader" "$root/etc/systemd/system/sysinit.target.wants"
install -m 644 "$kit/vmloader-agent.zip" "$root/usr/lib/vmloader/vmloader-agent.zip"
install -m 755 "$kit/adopt.sh" "$root/usr/lib/vmloader/adopt.sh"
install -m 644 "$kit/vmloader-adopt.service" "$root/etc/systemd/system/vmloader-adopt.service"
ln -sf /etc/systemd/system/vmloader-adopt.service "$root/etc/systemd/system/sysinit.target.wants/vmloader-adopt.service"
echo "vmloader's agent installed into $root (unit vmloader-adopt.service enabled)"
