#!/bin/sh
# Run the containers' HEALTHCHECKs every $POD_HEALTH_INTERVAL (5) seconds until killed. Podman schedules health
# checks with systemd timers; on a machine without systemd (these) nothing runs them, a container stays
# "starting", and compose's `condition: service_healthy` (the loadtest profile's locust) waits forever.
# `make test-stack` runs this beside `docker compose up`; containers without a health check are skipped.
while :; do
    for id in $(podman ps -q --filter status=running); do
        podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
    sleep "${POD_HEALTH_INTERVAL:-5}"
done
