#!/bin/sh
# Shows where it ran, reads its input, leaves an output file.
echo "kernel: $(uname -r)"
echo "hostname: $(hostname)"
echo "uid: $(id -u)"
echo "input: $(cat input.txt)"
echo "grid-security: $(ls /etc/grid-security 2>/dev/null | tr '\n' ' ')"
echo "hostkey mode: $(stat -c %a /etc/grid-security/hostkey.pem 2>/dev/null)"
echo "made in the VM" > result.txt
echo "a line for stderr" >&2
exit 3
