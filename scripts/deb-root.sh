#!/usr/bin/env bash
# Makes (once) the clean Debian 12 root that scripts/deb-test.sh installs the package into:
# debootstrap minbase plus php8.2-cli and php8.2-fpm, nothing of this project, no Rust.
# The root lives outside the clone at a fixed path so later runs on this machine reuse it
# (a warm run never touches the network); tests never change it, they mount an overlay on it.
#
#   scripts/deb-root.sh [DIR]      default /var/cache/amqp-rs/bookworm-deb; prints DIR
set -euo pipefail

root=${1:-/var/cache/amqp-rs/bookworm-deb}
suite=bookworm
packages=php8.2-cli,php8.2-fpm
ready="$root/.amqp-rs-root-ready"

# The mirror this machine's apt already uses, so the root is built from where the host's own
# packages come from (deb822 .sources first, then one-line .list files).
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk -v suite="$suite" '
      /^[[:space:]]*$/ { if (uri && ok) { print uri; exit } uri = ""; ok = 0; next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
      END { if (uri && ok) print uri }' "$f" | head -n1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] || continue
    awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' "$f"
  done
}

if [ -e "$ready" ]; then
  echo "$root"
  exit 0
fi

command -v debootstrap >/dev/null || {
  echo "deb-root: debootstrap is missing (scripts/setup.sh installs it)" >&2
  exit 1
}
url=$(mirror | grep -m1 . || true)
[ -n "$url" ] || { echo "deb-root: no '$suite' mirror in /etc/apt/sources.list*" >&2; exit 1; }

mkdir -p "$(dirname "$root")"
# One builder at a time: a second `make test` on the machine waits for the first one's root.
exec 9>"$root.lock"
flock 9
if [ ! -e "$ready" ]; then
  rm -rf "$root"    # a half-made root from an interrupted run is thrown away, not trusted
  echo "deb-root: debootstrap $suite ($packages) into $root from $url" >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$url" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    exit 1
  }
  # No service may start inside the root (php8.2-fpm's scripts would try on install/remove).
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  echo "deb $url $suite main" >"$root/etc/apt/sources.list"
  rm -f "$root"/var/cache/apt/archives/*.deb
  touch "$ready"
fi
echo "$root"
