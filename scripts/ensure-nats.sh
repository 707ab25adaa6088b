#!/usr/bin/env bash
# Makes sure the NATS server with JetStream that the agent bus tests use answers on
# 127.0.0.1:4222 (KILN_TEST_NATS_URL): starts the system's nats-server if it is stopped.
set -euo pipefail
port=4222
if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
  exit 0
fi
if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  echo "ensure-nats: nats-server is missing (hint: apt-get install nats-server)" >&2
  exit 1
fi
echo "ensure-nats: starting nats-server with JetStream on 127.0.0.1:$port" >&2
mkdir -p /var/lib/nats-server
start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
  -a 127.0.0.1 -p $port -js -sd /var/lib/nats-server -l /var/log/nats-server.log
for _ in $(seq 1 30); do
  (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && exit 0
  sleep 0.5
done
echo "ensure-nats: NATS on 127.0.0.1:$port does not answer (hint: see /var/log/nats-server.log)" >&2
exit 1
