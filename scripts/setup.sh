#!/usr/bin/env bash
# Installs what building and testing amqp_rs needs on Debian 12, skipping what is there.
set -euo pipefail

packages=(
  php8.2-cli php8.2-dev php8.2-mbstring php8.2-xml libclang-dev clang
  phpunit rabbitmq-server php8.2-amqp php-amqplib php-laravel-framework php8.2-sqlite3 php8.2-gd
  php8.2-fpm nginx apache2-utils debootstrap
  php-symfony-messenger php-symfony-console php-symfony-framework-bundle php-symfony-yaml
  php-symfony-amqp-messenger php-symfony-doctrine-messenger php-doctrine-dbal php-doctrine-persistence
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "setup: no Rust toolchain found (cargo); install Rust 1.88+ with rustup first" >&2
  exit 1
fi
