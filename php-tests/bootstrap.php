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
require_once __DIR__ . '/Support/BackgroundWorker.php';

// The examples and the Laravel app that tests start as child processes read AMQP_URI: point
// them at the test broker (AMQP_RS_TEST_URI when set).
putenv('AMQP_URI=' . AmqpRs\Tests\Support\Broker::uri());
