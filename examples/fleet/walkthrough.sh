#!/usr/bin/env bash
# The fleet walkthrough with one command: trains a small model, converts it for two profiles, starts
# Mosquitto, the controller with its dashboard, 20 simulated devices and one real edgepack-agent, then
# a canary that catches a regressing v2 and a v3 promoted from shadow. --quick: short soaks, stops at
# the end (CI). See README "Fleet walkthrough".
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/setup.sh all
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "walkthrough: needs mosquitto (apt-get install mosquitto)" >&2
        exit 1
    fi
fi
exec .venv/bin/python examples/fleet/walkthrough.py "$@"
