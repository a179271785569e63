#!/bin/sh
# "Build": package the program with the platform it was built on.
set -e
mkdir -p app
cp hello.sh app/
. /etc/os-release
echo "$PRETTY_NAME" > app/built-on
tar czf "app-$1.tar.gz" app
echo "built app-$1.tar.gz on $PRETTY_NAME"
