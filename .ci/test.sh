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
exec .venv/bin/python -m pytest -q --durations=30 "$@"
