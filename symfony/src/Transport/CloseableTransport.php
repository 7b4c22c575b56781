<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use Symfony\Component\Messenger\Transport\CloseableTransportInterface;

// Messenger 7.3 added CloseableTransportInterface (its AMQP transport implements it); 5.4 to
// 7.2 have none. The transport implements this interface, which is Messenger's where it exists.
if (interface_exists(CloseableTransportInterface::class)) {
    /** @internal */
    interface CloseableTransport extends CloseableTransportInterface
    {
    }
} else {
    /** @internal */
    interface CloseableTransport
    {
        public function close(): void;
    }
}
