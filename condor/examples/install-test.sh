#!/bin/sh
set -e
echo "uid: $(id -u)"
dpkg -i nightly-tool.deb
echo "user: $(getent passwd nightlysvc | cut -d: -f1)"
echo "config: $(cat /etc/nightly-tool.conf)"
