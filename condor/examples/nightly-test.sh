#!/bin/sh
# "Test": unpack the build for this platform and run it.
set -e
tar xzf "app-$1.tar.gz"
echo "$1: $(sh app/hello.sh) (built on $(cat app/built-on))" > "result-$1.txt"
cat "result-$1.txt"
