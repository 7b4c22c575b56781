#!/usr/bin/env bash
# make matrix: the whole suite again on today's newest stack, Debian unstable (sid): PHP 8.4,
# RabbitMQ 4.3, Laravel 13, PHPUnit 13, php-amqp 2.2 and php-amqplib 3.7, next to the host's
# oldest one (Debian 12) that `make test` runs first.
#
# The sid root lives OUTSIDE the clone, at a fixed path ($AMQP_RS_MATRIX_DIR, default
# /var/cache/amqp-rs), so a later run on this machine (CI runs in a fresh clone) reuses it, its
# apt cache and its PHP 8.4 build (target dir beside the root). On a new machine it is built from
# scratch with debootstrap. The extension is built inside the root against PHP 8.4 with the
# host's Rust toolchain (~/.cargo and ~/.rustup bind-mounted). The root's own RabbitMQ 4.3 node
# runs as rabbit43@localhost on 127.0.0.1:5673 (dist port 25680) beside the host's broker, and
# the tests reach it through AMQP_RS_TEST_URI / AMQP_RS_TEST_NODE (php-tests/Support/Broker.php
# and the cargo tests read them).
#
# Everything it starts is torn down by a trap, on failure too: the broker by pid, every process
# left inside the root, and every mount (checked with findmnt). The root is only ever deleted
# with rm --one-file-system after findmnt shows nothing mounted under it: with ~/.cargo mounted
# inside, a plain rm -rf would delete the host's toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD

DIR=${AMQP_RS_MATRIX_DIR:-/var/cache/amqp-rs}
ROOT=$DIR/sid
TARGET=$DIR/sid-target
NODE=rabbit43@localhost
PORT=5673
# Outside 25700-25999, where php-tests/Support/Node.php puts its nodes' dist ports.
DIST_PORT=25680
URI="amqp://guest:guest@127.0.0.1:$PORT/%2f"
# Where the checkout and the target dir appear inside the root.
IN_SRC=/work/amqp_rs
IN_TARGET=/work/target
APT=(apt-get -q -o Acquire::Check-Valid-Until=false)
# Bump when the root's setup (not its package list) changes, to rebuild the root.
ROOT_VERSION=1
PACKAGES=(
  php8.4-cli php8.4-dev php8.4-mbstring php8.4-xml php8.4-sqlite3 php8.4-amqp php8.4-fpm nginx
  libclang-dev clang gcc libc6-dev phpunit rabbitmq-server php-amqplib php-laravel-framework
  procps iproute2 util-linux openssl ca-certificates coreutils php-revolt-event-loop
  php-symfony-messenger php-symfony-console php-symfony-framework-bundle php-symfony-yaml
  php-symfony-amqp-messenger php-symfony-doctrine-messenger php-doctrine-dbal php-doctrine-persistence
  composer  # its Composer/InstalledVersions.php, which Symfony 6+'s FrameworkBundle asks
)

log() { printf 'matrix: %s\n' "$*"; }
die() { printf 'matrix: %s\n' "$*" >&2; exit 1; }
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# Everything mounted at or under $1, deepest first.
mounts_under() {
  findmnt -rn -o TARGET | awk -v r="$1" '$0 == r || index($0, r "/") == 1' | sort -r
}

unmount_all() {
  local m
  for m in $(mounts_under "$ROOT"); do
    umount -R "$m" 2>/dev/null || umount -R -l "$m" || true
  done
  if [ -n "$(mounts_under "$ROOT")" ]; then
    printf 'matrix: still mounted under %s:\n%s\n' "$ROOT" "$(mounts_under "$ROOT")" >&2
    return 1
  fi
}

# Processes whose root directory is the sid root: only this script starts any.
root_pids() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && echo "${p#/proc/}"
  done
  return 0
}

stop_root_processes() {
  local pids
  pids=$(root_pids)
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    [ -z "$(root_pids)" ] && return 0
    sleep 0.2
  done
  pids=$(root_pids)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

stop_broker() {
  [ -n "${BROKER_PID:-}" ] || return 0
  if kill -0 "$BROKER_PID" 2>/dev/null; then
    in_root rabbitmqctl -n "$NODE" stop >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
      kill -0 "$BROKER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$BROKER_PID" 2>/dev/null || true
  fi
  BROKER_PID=
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  stop_broker
  stop_root_processes
  unmount_all || rc=1
  log "torn down (broker stopped, nothing mounted under $ROOT)"
  exit $rc
}

# Deletes the root, never across a mount (see the header).
remove_root() {
  [ -e "$ROOT" ] || return 0
  unmount_all || die "refusing to delete $ROOT while something is mounted under it"
  rm -rf --one-file-system "$ROOT"
}

debian_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

make_root() {
  if [ -f "$ROOT/.amqp-rs-root" ] && [ "$(cat "$ROOT/.amqp-rs-root")" = "$ROOT_VERSION" ]; then
    log "reusing the sid root at $ROOT"
    return 0
  fi
  command -v debootstrap >/dev/null || {
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
  }
  log "building a sid root at $ROOT (debootstrap from $(debian_mirror))"
  remove_root
  mkdir -p "$DIR"
  debootstrap --variant=minbase sid "$ROOT" "$(debian_mirror)" >"$DIR/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $DIR/debootstrap.log"
  # The served copy of sid's Release file has expired; no services start inside the root.
  printf 'Acquire::Check-Valid-Until "false";\nAPT::Install-Recommends "false";\n' >"$ROOT/etc/apt/apt.conf.d/99amqp-rs"
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
  chmod +x "$ROOT/usr/sbin/policy-rc.d"
  echo "$ROOT_VERSION" >"$ROOT/.amqp-rs-root"
}

mount_root() {
  mkdir -p "$ROOT/root/.cargo" "$ROOT/root/.rustup" "$ROOT$IN_SRC" "$ROOT$IN_TARGET" "$TARGET"
  # RabbitMQ needs localhost resolvable (else epmd_error localhost nxdomain).
  cp /etc/resolv.conf /etc/hosts "$ROOT/etc/"
  mount -t proc proc "$ROOT/proc"
  mount --rbind /dev "$ROOT/dev"
  mount --make-rslave "$ROOT/dev"
  mount --bind "$HOME/.cargo" "$ROOT/root/.cargo"
  mount --bind "$HOME/.rustup" "$ROOT/root/.rustup"
  mount --bind "$SRC" "$ROOT$IN_SRC"
  mount --bind "$TARGET" "$ROOT$IN_TARGET"
}

install_packages() {
  local want
  want=$(printf '%s\n' "${PACKAGES[@]}" | sort)
  if [ -f "$ROOT/.amqp-rs-packages" ] && [ "$(cat "$ROOT/.amqp-rs-packages")" = "$want" ]; then
    return 0
  fi
  log "installing ${#PACKAGES[@]} packages in the root"
  in_root "${APT[@]}" update >"$DIR/apt.log" 2>&1 || die "apt-get update in the root failed: see $DIR/apt.log"
  in_root env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1 \
    || die "apt-get install in the root failed: see $DIR/apt.log"
  echo "$want" >"$ROOT/.amqp-rs-packages"
}

build_extension() {
  log "building the extension against PHP $(in_root php-config --version) (target $TARGET)"
  in_root env CARGO_TARGET_DIR="$IN_TARGET" cargo build --release --quiet --manifest-path "$IN_SRC/Cargo.toml"
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_broker() {
  local data=/var/lib/rabbitmq/mnesia pidfile
  pidfile=$data/$NODE.pid
  answers "$PORT" && die "port $PORT is taken: another broker runs there"
  answers "$DIST_PORT" && die "port $DIST_PORT (Erlang distribution) is taken"
  # A fresh node each run: no queue of an earlier run is left to meet.
  rm -rf --one-file-system "$ROOT$data"
  rm -f "$ROOT/var/log/rabbitmq/$NODE"*.log
  mkdir -p "$ROOT$data" "$ROOT/var/log/rabbitmq"
  in_root chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
  cat >"$ROOT/etc/rabbitmq/rabbitmq-env.conf" <<EOF
NODENAME=$NODE
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$PORT
DIST_PORT=$DIST_PORT
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  # RabbitMQ's own defaults otherwise: the tests must pass on 4.3 out of the box.
  printf 'loopback_users.guest = true\nraft.wal_max_size_bytes = 64000000\n' >"$ROOT/etc/rabbitmq/rabbitmq.conf"
  echo '[].' >"$ROOT/etc/rabbitmq/enabled_plugins"
  log "starting RabbitMQ $NODE on 127.0.0.1:$PORT"
  setsid chroot "$ROOT" /usr/bin/env -i HOME=/var/lib/rabbitmq PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    RABBITMQ_PID_FILE="$pidfile" /usr/sbin/rabbitmq-server >"$DIR/$NODE.console.log" 2>&1 </dev/null &
  LAUNCHER_PID=$!
  for _ in $(seq 1 120); do
    [ -s "$ROOT$pidfile" ] && break
    kill -0 "$LAUNCHER_PID" 2>/dev/null || die "rabbitmq-server exited: $(tail -n 20 "$DIR/$NODE.console.log")"
    sleep 0.5
  done
  BROKER_PID=$(cat "$ROOT$pidfile" 2>/dev/null || true)
  [ -n "$BROKER_PID" ] || die "no pid file from $NODE: $(tail -n 20 "$DIR/$NODE.console.log")"
  in_root rabbitmqctl -n "$NODE" await_startup --timeout 120 >/dev/null \
    || die "$NODE did not start: $(tail -n 20 "$DIR/$NODE.console.log")"
  for _ in $(seq 1 60); do answers "$PORT" && return 0; sleep 0.5; done
  die "$NODE does not answer on 127.0.0.1:$PORT"
}

print_versions() {
  STACK=$(in_root "$IN_SRC/scripts/stack.sh" "$NODE")
  log "stack: Debian sid: $STACK"
}

# Every PHP process of the run (PHPUnit and the workers, examples and Laravel apps the tests
# start) reports everything on stderr: PHP 8.4 must have nothing to say.
php_strict_ini() {
  printf '%s\n' 'error_reporting = E_ALL' 'display_errors = stderr' 'display_startup_errors = On' \
    >"$ROOT/etc/php/8.4/cli/conf.d/99-amqp-rs-matrix.ini"
}

# Compile-time deprecations (an implicitly nullable parameter, ...) in files no test loads.
lint_php() {
  local out
  out=$(in_root sh -c "cd $IN_SRC && find stubs examples laravel benches php-tests -name '*.php' -print0 \
    | xargs -0 -n 1 php -l 2>&1 | grep -v '^No syntax errors detected'" || true)
  [ -z "$out" ] || { printf '%s\n' "$out" >&2; return 1; }
  log "php -l on PHP 8.4: every PHP file clean"
}

run_tests() {
  local so=$IN_TARGET/release/libamqp_rs.so status=0
  lint_php || status=1
  log "cargo test (the core) against RabbitMQ on $PORT"
  AMQP_RS_TEST_URI=$URI cargo test --quiet 2>&1 | tee "$DIR/cargo-test.log" || status=1
  log "PHPUnit against RabbitMQ on $PORT"
  # E_ALL with deprecations shown and failing: PHP 8.4 and PHPUnit 13 must have nothing to say.
  in_root env AMQP_RS_TEST_URI="$URI" AMQP_RS_TEST_NODE="$NODE" TMPDIR=/tmp \
    php -d extension="$so" /usr/bin/phpunit \
    -c "$IN_SRC/php-tests/phpunit.xml" --display-all-issues --fail-on-deprecation \
    --fail-on-phpunit-deprecation --fail-on-notice --fail-on-warning --do-not-record-test-run-history ${MATRIX_PHPUNIT_ARGS:-} || status=1
  return $status
}

# What the tests did that RabbitMQ 4.3 deprecates (permitted today, refused by a later version).
report_deprecations() {
  local logfile=$ROOT/var/log/rabbitmq/$NODE.log
  [ -f "$logfile" ] || return 0
  if grep -qi 'deprecated feature' "$logfile"; then
    log "RabbitMQ $NODE logged deprecated features in use:"
    grep -i -o 'deprecated feature[^.]*' "$logfile" | sort | uniq -c | head -n 10
  else
    log "RabbitMQ $NODE logged no deprecated feature in use"
  fi
}

main() {
  [ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"
  mkdir -p "$DIR"
  exec 9>"$DIR/matrix.lock"
  flock -w 3600 9 || die "another matrix run holds $DIR/matrix.lock"
  local start=$SECONDS
  # A run killed before its trap could act may have left mounts or processes behind.
  if [ -d "$ROOT" ]; then
    stop_root_processes
    unmount_all
  fi
  trap teardown EXIT INT TERM
  make_root
  mount_root
  install_packages
  build_extension
  if [ "${1:-}" = "--prepare" ]; then
    log "root ready and extension built in $((SECONDS - start)) s"
    return 0
  fi
  php_strict_ini
  start_broker
  print_versions
  if [ "${1:-}" = "--run" ]; then
    # scripts/matrix.sh --run CMD...: CMD inside the root against its broker, instead of the suite.
    shift
    in_root env AMQP_RS_TEST_URI="$URI" AMQP_RS_TEST_NODE="$NODE" AMQP_URI="$URI" \
      EXT="$IN_TARGET/release/libamqp_rs.so" SRC="$IN_SRC" "$@"
    return
  fi
  local status=0
  run_tests || status=$?
  report_deprecations
  [ $status -eq 0 ] || die "the suite failed on the sid stack ($STACK)"
  log "sid stack ($STACK) green in $((SECONDS - start)) s"
}

main "$@"
