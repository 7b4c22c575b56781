#!/usr/bin/env bash
# Prints the stack the tests run on, in one line: PHP, RabbitMQ (of node $1, default
# rabbitmqctl's own), Laravel, Symfony, PHPUnit, php-amqp, php-amqplib. make test prints it for the host
# stack and scripts/matrix.sh for the sid root's, so the README's compatibility table can cite
# what a run printed.
set -uo pipefail
node_args=()
[ -n "${1:-}" ] && node_args=(-n "$1")
php_version=$(php -r 'echo PHP_VERSION;')
rabbitmq=$(rabbitmqctl "${node_args[@]}" version 2>/dev/null || echo '?')
laravel=$(php -r 'require "/usr/share/php/Illuminate/autoload.php"; echo Illuminate\Foundation\Application::VERSION;' 2>/dev/null || echo '?')
symfony=$(grep -o "VERSION = '[0-9.]*'" /usr/share/php/Symfony/Component/HttpKernel/Kernel.php 2>/dev/null | grep -o "[0-9.]*[0-9]")
phpunit=$(phpunit --version 2>/dev/null | grep -o 'PHPUnit [0-9.]*' | cut -d' ' -f2)
php_amqp=$(php -r 'echo phpversion("amqp") ?: "?";')
amqplib=$(dpkg-query -W -f='${Version}' php-amqplib 2>/dev/null | sed 's/-[^-]*$//')
echo "PHP $php_version, RabbitMQ $rabbitmq, Laravel $laravel, Symfony ${symfony:-?}, PHPUnit ${phpunit:-?}, php-amqp $php_amqp, php-amqplib ${amqplib:-?}"
