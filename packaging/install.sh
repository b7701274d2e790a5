#!/bin/sh
# Installs staybound from an unpacked release tarball (made by scripts/release.sh):
#
#   sudo ./install.sh                  # into /usr/local, config into /etc/staybound
#   PREFIX=/opt/staybound ./install.sh
#   DESTDIR=/tmp/root ./install.sh     # staged, for packaging
#
# Installs the binary, the man page, bash, zsh and fish completions and the systemd unit; installs the
# example config as /etc/staybound/staybound.toml only when none is there, so an upgrade keeps yours.
# Then: edit the config, `staybound check`, `systemctl enable --now staybound`.
set -eu
cd "$(dirname "$0")"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
ETC=${ETC:-/etc/staybound}
SYSTEMD=${SYSTEMD:-/etc/systemd/system}

install -D -m 0755 bin/staybound "$DESTDIR$PREFIX/bin/staybound"
install -D -m 0644 man/staybound.1 "$DESTDIR$PREFIX/share/man/man1/staybound.1"
install -D -m 0644 completions/staybound.bash "$DESTDIR$PREFIX/share/bash-completion/completions/staybound"
install -D -m 0644 completions/_staybound "$DESTDIR$PREFIX/share/zsh/site-functions/_staybound"
install -D -m 0644 completions/staybound.fish "$DESTDIR$PREFIX/share/fish/vendor_completions.d/staybound.fish"
# The unit names /usr/local/bin/staybound; another PREFIX is written into the installed copy.
mkdir -p "$DESTDIR$SYSTEMD"
sed "s#/usr/local/bin/staybound#$PREFIX/bin/staybound#g" systemd/staybound.service >"$DESTDIR$SYSTEMD/staybound.service"
chmod 0644 "$DESTDIR$SYSTEMD/staybound.service"
if [ -e "$DESTDIR$ETC/staybound.toml" ]; then
    echo "kept $DESTDIR$ETC/staybound.toml (the example is in $PREFIX/share/doc/staybound)"
else
    install -D -m 0644 config/staybound.example.toml "$DESTDIR$ETC/staybound.toml"
    echo "installed $DESTDIR$ETC/staybound.toml from the example: edit it, then run staybound check"
fi
mkdir -p "$DESTDIR$PREFIX/share/doc/staybound"
cp config/*.toml README.md LICENSE "$DESTDIR$PREFIX/share/doc/staybound/"
echo "installed staybound $("$DESTDIR$PREFIX/bin/staybound" --version | cut -d' ' -f2) into $DESTDIR$PREFIX"
