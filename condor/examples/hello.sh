#!/bin/sh
echo "hello from $(. /etc/os-release; echo $VERSION_CODENAME)"
