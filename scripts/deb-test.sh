#!/usr/bin/env bash
# Tests the Debian package (make deb) as a user meets it: apt-get install into a clean Debian 12
# root that has PHP 8.2 (cli and fpm) and nothing else, then use it, then remove it.
#
# The root (scripts/deb-root.sh) is made once per machine and never changed: each case runs in
# an overlay on it, thrown away at the end, so every case starts from the clean root. The host's
# network is shared, so the root's PHP reaches the host's broker at 127.0.0.1:5672.
# If another run left a PHP 8.4 root at /var/cache/amqp-rs/sid (the newest-stack matrix), the
# PHP 8.2 package and .so are also tried there, through an overlay too (it is never written),
# and that run's PHP 8.4 build, when there is one, is packaged and installed there.
#
#   scripts/deb-test.sh [DEB]      default target/deb/php8.2-amqp-rs_*_amd64.deb
# Closes with 'N passed, N failed, N skipped'; exits non-zero when anything failed. VERBOSE=1
# shows what each case printed (apt's refusals, PHP's messages), also when it passed.
set -uo pipefail
cd "$(dirname "$0")/.."

deb=${1:-$(ls -t target/deb/php8.2-amqp-rs_*_amd64.deb 2>/dev/null | head -n1)}
so=target/release/libamqp_rs.so
sid=${AMQP_RS_SID_ROOT:-/var/cache/amqp-rs/sid}
sid_so=${AMQP_RS_SID_SO:-/var/cache/amqp-rs/sid-target/release/libamqp_rs.so}   # its 8.4 build
passed=0 failed=0 skipped=0
work=$(mktemp -d /var/tmp/amqp-rs-deb-test.XXXXXX)
mounts=()

cleanup() {
  local m
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    m=${mounts[i]}
    findmnt -rn "$m" >/dev/null && { umount -R "$m" || umount -R -l "$m"; }
  done
  if findmnt -rn -o TARGET | grep -q "^$work"; then
    echo "not ok - mounts left under $work:" >&2
    findmnt -rn -o TARGET | grep "^$work" >&2
    failed=$((failed + 1))
  else
    rm -rf "$work"
  fi
  echo "$passed passed, $failed failed, $skipped skipped"
  ((failed == 0))
}
trap 'cleanup; exit $?' EXIT
trap 'exit 130' INT TERM

# check NAME COMMAND...: one case; its output is shown only when it fails.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    echo "ok - $name"
    [ -z "${VERBOSE:-}" ] || printf '%s\n' "$out" | sed 's/^/    /' | tail -n 30
    passed=$((passed + 1))
  else
    echo "not ok - $name"
    printf '%s\n' "$out" | sed 's/^/    /' | tail -n 30
    failed=$((failed + 1))
  fi
}
skip() { echo "skip - $1"; skipped=$((skipped + 1)); }

# overlay NAME LOWER: a throwaway writable copy of LOWER with /proc, at $work/NAME/root, whose
# path it leaves in $top (not printed: a subshell would lose the record of the mount).
overlay() {
  local dir=$work/$1
  top=$dir/root
  mkdir -p "$dir/upper" "$dir/work" "$top"
  mount -t overlay overlay -o "lowerdir=$2,upperdir=$dir/upper,workdir=$dir/work" "$top" ||
    return 1
  mounts+=("$top")
  mount -t proc proc "$top/proc"
}
in_root() {
  local r=$1
  shift
  chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}
# Offline (the root's package lists are its own), and with no terminal for dpkg: the roots have
# no /dev/pts.
apt_get() {
  local r=$1
  shift
  in_root "$r" apt-get -y -q --no-install-recommends -o Acquire::Retries=0 -o Dpkg::Use-Pty=0 "$@"
}
apt_install() {   # ROOT DEB: apt-get install DEB as a file, as a user does with ./name.deb
  cp "$2" "$1/tmp/" &&
    apt_get "$1" install "/tmp/$(basename "$2")"
}

# --- the checks ---------------------------------------------------------------------------
installs() { apt_install "$r" "$deb"; }
ri_shows_build() {
  local info commit
  info=$(in_root "$r" php --ri amqp_rs) || return 1
  # In a checkout, the package must name the commit checked out (make rebuilds when HEAD moves).
  commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  echo "$info"
  echo "expected: git commit => $commit (the checkout; make deb rebuilds a stale .so)"
  grep -q '^amqp_rs support => enabled' <<<"$info" &&
    grep -q '^PHP API (built for) => 20220829' <<<"$info" &&
    grep -q "^git commit => $commit\$" <<<"$info"
}
enabled_cli_fpm() {
  ls -l "$r"/etc/php/8.2/*/conf.d/*amqp_rs* &&
    [ -L "$r/etc/php/8.2/cli/conf.d/30-amqp_rs.ini" ] &&
    [ -L "$r/etc/php/8.2/fpm/conf.d/30-amqp_rs.ini" ]
}
roundtrip() {
  cp php-tests/deb/roundtrip.php "$r/tmp/" && in_root "$r" php /tmp/roundtrip.php
}
fpm_loads() {
  local mods
  mods=$(in_root "$r" php-fpm8.2 -m) || return 1
  grep -qx amqp_rs <<<"$mods" && in_root "$r" php-fpm8.2 -t
}
removes_clean() {
  local out
  apt_get "$r" remove php8.2-amqp-rs || return 1
  # Nothing enabled is left, and no PHP warns of a missing module (what a dangling ini causes).
  out=$(in_root "$r" php -m 2>&1) || return 1
  echo "$out" | grep -i 'amqp_rs\|warning' && return 1
  out=$(in_root "$r" php-fpm8.2 -m 2>&1) || return 1
  echo "$out" | grep -i 'amqp_rs\|warning' && return 1
  find "$r/etc/php" "$r/usr/lib/php" -name '*amqp_rs*' ! -path '*/mods-available/*' | grep . &&
    return 1
  # The ini in mods-available is a conffile: Debian keeps it, disabled, until purge.
  apt_get "$r" purge php8.2-amqp-rs || return 1
  find "$r/etc/php" "$r/usr/lib/php" -name '*amqp_rs*' | grep . && return 1
  ! in_root "$r" dpkg-query -W -f='${db:Status-Status}\n' php8.2-amqp-rs 2>/dev/null | grep -qx installed
}
# A package for another PHP: what scripts/deb.sh makes for PHP 8.4, from this .so with its build
# id relabelled (same length), since a real 8.4 build needs the 8.4 root. apt must refuse it
# here for want of phpapi-20240924, and leave nothing installed.
refuses_other_php() {
  local fake=$work/fake84 out
  mkdir -p "$fake"
  sed 's/API20220829,NTS/API20240924,NTS/' "$so" >"$fake/libamqp_rs.so"
  printf '#!/bin/sh\ncase "$1" in\n --version) echo 8.4.16 ;;\n --phpapi) echo 20240924 ;;\n --extension-dir) echo /usr/lib/php/20240924 ;;\nesac\n' \
    >"$fake/php-config"
  chmod +x "$fake/php-config"
  other=$(scripts/deb.sh --php-config "$fake/php-config" --so "$fake/libamqp_rs.so" --out "$fake") ||
    return 1
  dpkg-deb -f "$other" Depends
  out=$(apt_install "$r" "$other" 2>&1) && { echo "$out"; echo "apt installed it"; return 1; }
  echo "$out" | tail -n 8
  grep -q 'phpapi-20240924' <<<"$out" &&
    ! in_root "$r" dpkg-query -W -f='${db:Status-Status}\n' php8.4-amqp-rs 2>/dev/null | grep -qx installed &&
    [ ! -e "$r/usr/lib/php/20240924/amqp_rs.so" ]
}
# scripts/deb.sh itself refuses to label a .so for a PHP it was not built for.
deb_sh_refuses_mismatch() {
  local out
  out=$(scripts/deb.sh --php-config "$work/fake84/php-config" --so "$so" --out "$work/none" 2>&1) &&
    return 1
  echo "$out"
  grep -q 'built for API20220829,NTS, not PHP 8.4.16' <<<"$out"
}
sid_refuses_82() {
  local out
  out=$(apt_install "$s" "$deb" 2>&1) && { echo "$out"; echo "apt installed it"; return 1; }
  echo "$out" | tail -n 8
  grep -q 'phpapi-20220829' <<<"$out"
}
# PHP's own check: a module built for another API is refused with a message, and PHP goes on.
sid_php_refuses_82_so() {
  local out rc
  cp "$so" "$s/tmp/amqp_rs-8.2.so"
  out=$(in_root "$s" php8.4 -d extension=/tmp/amqp_rs-8.2.so -r 'echo "php still runs\n";' 2>&1)
  rc=$?
  echo "$out (exit $rc)"
  ((rc == 0)) && grep -q 'Module compiled with module API=20220829' <<<"$out" &&
    grep -q 'PHP    compiled with module API=20240924' <<<"$out" &&
    grep -q 'php still runs' <<<"$out"
}

# php8.4-amqp-rs from the matrix run's PHP 8.4 build: installs and works in the PHP 8.4 root.
sid_installs_84() {
  local pkg out
  pkg=$(scripts/deb.sh --php-config "$sid/usr/bin/php-config8.4" --so "$sid_so" --out "$work/deb84") ||
    return 1
  dpkg-deb -f "$pkg" Package Depends
  apt_install "$s" "$pkg" || return 1
  out=$(in_root "$s" php8.4 --ri amqp_rs) || return 1
  grep -q '^amqp_rs support => enabled' <<<"$out" || { echo "$out"; return 1; }
  cp php-tests/deb/roundtrip.php "$s/tmp/" && in_root "$s" php8.4 /tmp/roundtrip.php
}

# --- run ----------------------------------------------------------------------------------
[ -f "$deb" ] || { echo "not ok - no package: run make deb first"; failed=1; exit 1; }
[ -f "$so" ] || { echo "not ok - no $so: run make build first"; failed=1; exit 1; }
echo "# package: $deb ($(stat -c %s "$deb") bytes)"
base=$(scripts/deb-root.sh) || { echo "not ok - clean bookworm root"; failed=1; exit 1; }

overlay install "$base" || { echo "not ok - overlay on $base"; failed=1; exit 1; }
r=$top
check "apt-get install ./$(basename "$deb") in a clean PHP 8.2 root" installs
check "php --ri amqp_rs shows the API and commit it was built for" ri_shows_build
check "enabled for cli and fpm by phpenmod" enabled_cli_fpm
check "publish with confirms and consume on the host's broker" roundtrip
check "php-fpm8.2 -m lists amqp_rs" fpm_loads
check "apt-get remove leaves nothing enabled, purge leaves no ini" removes_clean

overlay other "$base" || { echo "not ok - overlay on $base"; failed=1; exit 1; }
r=$top
check "apt refuses a php8.4 package in the PHP 8.2 root" refuses_other_php
check "deb.sh refuses to package an 8.2 .so for PHP 8.4" deb_sh_refuses_mismatch

if [ -x "$sid/usr/bin/php8.4" ] && [ -x "$sid/usr/bin/apt-get" ] && overlay sid "$sid" &&
  s=$top && in_root "$s" php8.4 -v >/dev/null 2>&1; then
  check "apt refuses the php8.2 package in the PHP 8.4 root" sid_refuses_82
  check "PHP 8.4 refuses the 8.2 .so with its API-mismatch message, no crash" sid_php_refuses_82_so
  if [ -x "$sid/usr/bin/php-config8.4" ] && [ -f "$sid_so" ]; then
    check "php8.4-amqp-rs (from $sid_so) installs and round-trips in the PHP 8.4 root" sid_installs_84
  else
    skip "php8.4-amqp-rs: no PHP 8.4 build at $sid_so"
  fi
else
  skip "PHP 8.4 cases: no usable PHP 8.4 root at $sid"
  skip "PHP 8.4 refuses the 8.2 .so: no PHP 8.4 root"
  skip "php8.4-amqp-rs: no PHP 8.4 root"
fi
