#!/usr/bin/env bash
# A release tarball of staybound, from this checkout, for machines without a Rust toolchain:
#
#   scripts/release.sh                 # builds with `cargo build --release --locked`, then packs
#   scripts/release.sh --no-build      # packs the release binary already in target/release
#
# Writes target/dist/staybound-VERSION-TARGET.tar.gz and its .sha256, holding:
#   bin/staybound                      the binary
#   man/staybound.1                    the man page (`staybound man`)
#   completions/                       bash, zsh and fish completions (`staybound completions SHELL`)
#   config/                            the example, the minimal and the image's config
#   systemd/staybound.service          the hardened unit
#   install.sh                         installs all of it (PREFIX, DESTDIR; keeps an existing config)
#   README.md, LICENSE
# Then checks what it made: the tarball unpacks, install.sh installs it into a scratch DESTDIR, and the
# installed binary runs and accepts the example config.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
case "${1:-}" in
    --no-build) build=0 ;;
    "") ;;
    *) echo "usage: scripts/release.sh [--no-build]" >&2; exit 64 ;;
esac
if [ "$build" = 1 ]; then cargo build --release --locked --bin staybound; fi
bin=target/release/staybound
[ -x "$bin" ] || { echo "release: $bin is missing; run without --no-build" >&2; exit 1; }

version=$("$bin" --version | awk '{print $2}')
target=$(rustc -vV | sed -n 's/^host: //p')
name=staybound-$version-$target
dist=target/dist
stage=$dist/$name
rm -rf "$stage" "$dist/$name.tar.gz" "$dist/$name.tar.gz.sha256"
mkdir -p "$stage"/{bin,man,completions,config,systemd}

install -m 0755 "$bin" "$stage/bin/staybound"
"$bin" man >"$stage/man/staybound.1"
"$bin" completions bash >"$stage/completions/staybound.bash"
"$bin" completions zsh >"$stage/completions/_staybound"
"$bin" completions fish >"$stage/completions/staybound.fish"
install -m 0644 config/staybound.example.toml config/minimal.toml config/image.toml "$stage/config/"
install -m 0644 deploy/systemd/staybound.service "$stage/systemd/"
install -m 0755 packaging/install.sh "$stage/install.sh"
install -m 0644 README.md LICENSE "$stage/"
# why: the same bytes for the same inputs: sorted names, fixed owner and time.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' -C "$dist" -czf "$dist/$name.tar.gz" "$name"
(cd "$dist" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")

# The check: unpack, install into a scratch root, run what was installed.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tar -xzf "$dist/$name.tar.gz" -C "$scratch"
DESTDIR="$scratch/root" "$scratch/$name/install.sh" >/dev/null
for f in usr/local/bin/staybound usr/local/share/man/man1/staybound.1 \
         usr/local/share/bash-completion/completions/staybound usr/local/share/zsh/site-functions/_staybound \
         usr/local/share/fish/vendor_completions.d/staybound.fish etc/systemd/system/staybound.service \
         etc/staybound/staybound.toml; do
    [ -s "$scratch/root/$f" ] || { echo "release: install.sh did not install $f" >&2; exit 1; }
done
"$scratch/root/usr/local/bin/staybound" check --config "$scratch/root/etc/staybound/staybound.toml" >/dev/null
echo "release: $dist/$name.tar.gz ($(du -h "$dist/$name.tar.gz" | cut -f1)), installs and runs"
