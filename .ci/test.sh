#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv (and mosquitto for the broker tests when apt is
# available), then run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh all
if ! command -v mosquitto >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null) \
        || echo "warning: could not install mosquitto; broker tests will be skipped" >&2
fi
# PostgreSQL for the tests of several controllers sharing a fleet (skipped when it cannot be installed).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
        || echo "warning: could not install postgresql; the PostgreSQL tests will be skipped" >&2
fi
# nginx for the tests of bundles downloaded over HTTP(S) with Range requests (skipped without it). Its
# package would start the system service on port 80: policy-rc.d says no while it installs.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    policy_added=
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_added=1; fi
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null) \
        || echo "warning: could not install nginx; the HTTP download tests will be skipped" >&2
    if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# Chromium and its driver for the dashboard's browser test (skipped without them).
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "warning: could not install chromium; the dashboard's browser test will be skipped" >&2
fi
exec .venv/bin/python -m pytest -q --durations=30 "$@"
