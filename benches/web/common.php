<?php
// Settings of the W scenarios' scripts, from the fpm pool's environment (benches/web.php sets
// them per measurement): the broker, the queue, and whether the client keeps its connection
// across requests (amqp_rs 'persistent', php-amqp pconnect()).
define('BODY', str_pad('published by a web request', 100, 'x'));  // 100 B, as in P and R
$host = getenv('AMQP_HOST') ?: '127.0.0.1';
$port = (int) (getenv('AMQP_PORT') ?: 5672);
$queue = (string) getenv('QUEUE');
$persistent = getenv('PERSISTENT') === '1';
$uri = "amqp://guest:guest@$host:$port/%2f";
