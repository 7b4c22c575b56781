#!/usr/bin/env bash
# Starts a local RabbitMQ when nothing answers on 127.0.0.1:5672; leaves a running one alone.
set -euo pipefail

answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if answers; then
  exit 0
fi
echo "broker: nothing on 127.0.0.1:5672, starting rabbitmq-server"
rabbitmq-server -detached
rabbitmqctl await_startup --timeout 120 >/dev/null
for _ in $(seq 1 60); do
  answers && exit 0
  sleep 1
done
echo "broker: RabbitMQ did not open 127.0.0.1:5672" >&2
exit 1
