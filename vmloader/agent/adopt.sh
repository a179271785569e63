#!/bin/sh
# Start vmloader's agent in a guest that does not ship it (a distribution's cloud image).
# Run as root by whatever delivered it (the QEMU guest agent's guest-exec, cloud-init's
# bootcmd, a unit of the image's own: docs/stock-images.md), with the directory holding
# vmloader-agent.zip as $1 and the way it came as $2 (reported to the host).
# Exit codes: 0 started (prints "started"), or started before (prints "already started");
# 3 no usable python3; 4 no way to create the job user.
dir=${1:?usage: adopt.sh DIR-WITH-vmloader-agent.zip [DELIVERY]}
delivery=${2:-builtin}
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
py=$(command -v python3)
if [ -z "$py" ]; then
  echo "vmloader: the guest has no python3 (the agent needs python3 >= 3.6)" >&2
  exit 3
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 6))'; then
  echo "vmloader: the guest's python3 is older than 3.6 (the agent needs python3 >= 3.6)" >&2
  exit 3
fi
# The unprivileged job user: cloud images keep their default user at 1000, so ours starts at 60000.
if ! getent passwd vmloader >/dev/null 2>&1; then
  uid=60000
  while getent passwd "$uid" >/dev/null 2>&1 || getent group "$uid" >/dev/null 2>&1; do uid=$((uid + 1)); done
  if command -v useradd >/dev/null 2>&1; then
    useradd -m -u "$uid" -U -s /bin/sh -c "vmloader job user" vmloader || exit 4
  elif command -v adduser >/dev/null 2>&1; then
    adduser -D -u "$uid" -s /bin/sh vmloader || exit 4
  else
    echo "vmloader: neither useradd nor adduser in the guest to create the job user" >&2
    exit 4
  fi
fi
mkdir -p /work && chown vmloader:vmloader /work && chmod 755 /work
# Two deliveries may both arrive (qemu-ga and cloud-init): the first one starts the agent.
mkdir -p /run/vmloader && chmod 700 /run/vmloader
if ! mkdir /run/vmloader/agent-started 2>/dev/null; then
  echo "already started"
  exit 0
fi
modprobe virtio_console 2>/dev/null
echo started
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  # cloud-init runs this before basic.target: neither wait for the unit nor order it after that
  exec systemd-run --quiet --no-block --unit=vmloader-agent --collect -p Restart=always -p DefaultDependencies=no \
    --setenv=PYTHONPATH="$dir/vmloader-agent.zip" --setenv=VMLOADER_AGENT_DELIVERY="$delivery" \
    "$py" -m vmloader.agent
fi
PYTHONPATH="$dir/vmloader-agent.zip" VMLOADER_AGENT_DELIVERY="$delivery" \
  setsid "$py" -m vmloader.agent </dev/null >/dev/null 2>&1 &
exit 0
