#!/usr/bin/env bash
# Writes the maintainer scripts of php<ver>-amqp-rs into DIR: the same ones dh_php writes for
# Debian's own extension packages (php8.2-amqp's postinst/prerm/postrm), for module amqp_rs.
#   scripts/deb-maintscripts.sh 8.2 DIR
set -euo pipefail
ver=$1
dir=$2

# Enabled for every SAPI this PHP has (cli, fpm, apache2, cgi, phpdbg), as php_invoke does for
# Debian's packages; phpenmod alone when the helper is missing (php-common older than 69).
cat >"$dir/postinst" <<EOF
#!/bin/sh
set -e

if [ -e /usr/lib/php/php-maintscript-helper ] ; then
    . /usr/lib/php/php-maintscript-helper
    php_invoke enmod "$ver" ALL amqp_rs || exit 1
else
    phpenmod -v "$ver" amqp_rs
fi
EOF

# On upgrade, disable first, so that a changed priority in the new ini takes effect.
cat >"$dir/prerm" <<EOF
#!/bin/sh
set -e

if [ "\$1" = "upgrade" ] && [ -e /usr/lib/php/php-maintscript-helper ] ; then
    . /usr/lib/php/php-maintscript-helper
    php_invoke dismod "$ver" ALL amqp_rs || exit 1
fi
EOF

# remove: the conf.d links go, so no PHP tries to load a .so that is gone. The ini itself is a
# conffile, kept until purge, as for every Debian package; purge also drops stale links.
cat >"$dir/postrm" <<EOF
#!/bin/sh
set -e

if [ "\$1" = "remove" ] ; then
    if [ -e /usr/lib/php/php-maintscript-helper ] ; then
        . /usr/lib/php/php-maintscript-helper
        php_invoke dismod "$ver" ALL amqp_rs || exit 1
    elif command -v phpdismod >/dev/null ; then
        phpdismod -v "$ver" amqp_rs
    fi
fi

if [ "\$1" = "purge" ] ; then
    find "/etc/php/$ver" -xtype l 2>/dev/null | while read -r link ; do
        if [ "\$(basename "\$(readlink -m "\$link")")" = "amqp_rs.ini" ] ; then
            rm -f "\$link"
        fi
    done
fi
EOF
chmod 0755 "$dir/postinst" "$dir/prerm" "$dir/postrm"
