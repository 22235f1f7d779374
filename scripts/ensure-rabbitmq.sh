#!/usr/bin/env bash
# Make sure the local RabbitMQ answers; start it when it is installed but down.
# Exits non-zero when no broker can be had: the test run must fail, never skip.
set -euo pipefail
URL_HOST=${AUDIOSTREAM_TEST_BROKER_HOST:-127.0.0.1}
URL_PORT=${AUDIOSTREAM_TEST_BROKER_PORT:-5672}

port_open() { (exec 3<>"/dev/tcp/${URL_HOST}/${URL_PORT}") 2>/dev/null; }

if port_open; then
  echo "RabbitMQ is up on ${URL_HOST}:${URL_PORT}"
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not reachable on ${URL_HOST}:${URL_PORT} and rabbitmq-server is not installed" >&2
  exit 1
fi
echo "starting RabbitMQ (rabbitmq-server -detached)"
# The broker outlives this script: it must not inherit our descriptors (a caller's
# `flock` on fd 3 would otherwise stay held for as long as the broker runs).
(
  for fd in /proc/$BASHPID/fd/*; do
    n=${fd##*/}
    if [ "$n" -gt 2 ]; then eval "exec $n>&-"; fi
  done 2>/dev/null
  exec rabbitmq-server -detached
) || true
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl wait --timeout 120 "$(ls /var/lib/rabbitmq/mnesia/*.pid 2>/dev/null | head -1)" >/dev/null 2>&1 \
    || rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
fi
for _ in $(seq 1 120); do
  if port_open; then
    echo "RabbitMQ is up on ${URL_HOST}:${URL_PORT}"
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not come up within 120 s" >&2
exit 1
