<?php
// Runs the suites against the extension the Makefile loads with -d extension=...

declare(strict_types=1);

if (!extension_loaded('amqp_rs')) {
    fwrite(STDERR, "amqp_rs is not loaded: run the tests with `make test-php`\n");
    exit(1);
}

require_once '/usr/share/php/PhpAmqpLib/autoload.php';
require_once __DIR__ . '/Support/Broker.php';
require_once __DIR__ . '/Support/Children.php';
