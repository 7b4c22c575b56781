#!/usr/bin/env bash
# Packages an already built extension as php<ver>-amqp-rs_<version>_<arch>.deb for one PHP, the
# way Debian packages its own PHP extensions (php8.2-amqp is the model): the .so in that PHP's
# extension dir, mods-available/amqp_rs.ini enabled with phpenmod, Depends on phpapi-<api> so
# apt refuses a PHP the module was not built for. It never builds: it packages the .so given.
#
#   scripts/deb.sh [--php-config PATH] [--so PATH] [--out DIR]
#     --php-config  the php-config of the PHP the .so was built against (default php-config);
#                   it may be another root's, e.g. ROOT/usr/bin/php-config8.4
#     --so          default target/release/libamqp_rs.so
#     --out         where the .deb goes (default target/deb); its path is printed last
# Needs only bash, coreutils, grep, sed and dpkg-deb (strip is used when present).
set -euo pipefail
cd "$(dirname "$0")/.."

php_config=php-config
so=target/release/libamqp_rs.so
out=target/deb
while (($#)); do
  case "$1" in
    --php-config) php_config=$2; shift 2 ;;
    --so) so=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "deb: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
fail() { echo "deb: $*" >&2; exit 1; }

[ -f "$so" ] || fail "no extension at $so: run make build first"
php_version=$("$php_config" --version) || fail "cannot run $php_config"
php_ver=$(echo "$php_version" | cut -d. -f1,2)                   # 8.2
phpapi=$("$php_config" --phpapi)                                   # 20220829 on Debian's PHP 8.2
ext_dir=$("$php_config" --extension-dir)                           # /usr/lib/php/20220829
[[ "$php_ver" =~ ^[0-9]+\.[0-9]+$ && "$phpapi" =~ ^[0-9]{8}$ ]] ||
  fail "$php_config gave version '$php_version', phpapi '$phpapi'"

# The engine refuses a module built for another API, so must the package: the .so carries the
# build id of the PHP headers it was compiled with (ZEND_MODULE_BUILD_ID, e.g. API20220829,NTS).
built_for=$(grep -aoE -m1 'API[0-9]{8},N?TS' "$so" | head -n1 || true)
[ "${built_for%%,*}" = "API$phpapi" ] ||
  fail "$so was built for ${built_for:-an unknown PHP API}, not PHP $php_version (API$phpapi)"

field() { sed -n "s/^$1 *= *\"\(.*\)\"/\1/p" Cargo.toml | head -n1; }
version=$(field version)
license=$(field license)
homepage=$(field homepage)
# Debian's synopsis starts without an article.
synopsis=$(field description | sed -E 's/^(A|An|The) //')
commit=$(grep -aoE -m1 'amqp_rs-commit=[^;]{1,64};' "$so" | head -n1 | sed 's/^[^=]*=//; s/;$//' || true)
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the .so asks for is the libc6 it needs (what dpkg-shlibdeps
# would find, without needing dpkg-dev).
glibc=$(grep -aoE 'GLIBC_2\.[0-9]+' "$so" | sort -uV | tail -n1 | cut -d_ -f2 || true)
[ -n "$glibc" ] || fail "$so asks for no GLIBC_2.x symbol version: is it a glibc build?"
package="php$php_ver-amqp-rs"
deb="$out/${package}_${version}_${arch}.deb"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"    # becomes the package's "./": mktemp's 0700 would be wrong there
install -d "$stage/DEBIAN" "$stage$ext_dir" "$stage/etc/php/$php_ver/mods-available" \
  "$stage/usr/share/doc/$package"
install -m 0644 "$so" "$stage$ext_dir/amqp_rs.so"
# Debian ships extensions stripped; the debug info is two thirds of the file.
if command -v strip >/dev/null; then strip --strip-unneeded "$stage$ext_dir/amqp_rs.so"; fi

cat >"$stage/etc/php/$php_ver/mods-available/amqp_rs.ini" <<EOF
; configuration for php amqp_rs module
; priority=30
extension=amqp_rs.so
EOF
echo "/etc/php/$php_ver/mods-available/amqp_rs.ini" >"$stage/DEBIAN/conffiles"

cat >"$stage/usr/share/doc/$package/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: amqp_rs
Source: $homepage

Files: *
Copyright: $(date -u +%Y) amqp_rs contributors
License: $license
EOF
if [ "$license" = MIT ]; then
  cat >>"$stage/usr/share/doc/$package/copyright" <<'EOF'
 Permission is hereby granted, free of charge, to any person obtaining a copy of this software
 and associated documentation files (the "Software"), to deal in the Software without
 restriction, including without limitation the rights to use, copy, modify, merge, publish,
 distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
 Software is furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in all copies or
 substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
 BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
 NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
 DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
EOF
fi

maintainer="amqp_rs maintainers <maintainers@amqp-rs.invalid>"
gzip -9n >"$stage/usr/share/doc/$package/changelog.gz" <<EOF
$package ($version) unstable; urgency=medium

  * amqp_rs $version for PHP $php_version, built from commit ${commit:-unknown}.

 -- $maintainer  $(date -u -R)
EOF

scripts/deb-maintscripts.sh "$php_ver" "$stage/DEBIAN"

size_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: $package
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size_kib
Pre-Depends: php-common (>= 2:69~)
Depends: php$php_ver-common, phpapi-$phpapi, libc6 (>= $glibc), libgcc-s1 (>= 4.2)
Provides: php-amqp-rs
Section: php
Priority: optional
Homepage: $homepage
License: $license
Description: $synopsis
 amqp_rs gives PHP native classes (namespace AmqpRs) for RabbitMQ:
 connections with automatic recovery and cluster failover, a producer
 with pipelined publisher confirms, consumers with graceful stop on
 signals, RPC, retries and delayed messages.
 .
 This package is built for PHP $php_version (module API $phpapi) from
 amqp_rs commit ${commit:-unknown}. It needs no Rust toolchain: the
 extension is one .so, enabled for every installed SAPI (cli, fpm, ...)
 with phpenmod. License: $license.
EOF

(cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) \
  >"$stage/DEBIAN/md5sums"
mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
