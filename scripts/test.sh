#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the peers the tests use (Debian packages), checks
# formatting and lints, then runs every test. Failover tests build network namespaces and need root; as
# non-root they print a loud SKIP, and with STAYBOUND_REQUIRE_NETNS=1 (CI) a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools haproxy:haproxy \
            arping:arping ip:iproute2 curl:curl promtool:prometheus nft:nftables openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# The postgres preset's lab runs Debian's server binaries, which are not on PATH.
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "missing packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
        exit 1
    fi
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# The build without the default `demo` feature (what a library user or a minimal image gets) must stay clean.
cargo clippy --locked --no-default-features --features netlink --lib --bins -- -D warnings
# The modules' dependency picture has no circles (scripts/module-graph.py draws it).
python3 scripts/module-graph.py --check
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast "$@"
else
    # why: without nextest, libtest runs all of tests/it as threads of one process, where each file used to be
    # a process of its own. That is safe: no test changes process-wide state (environment, signal handlers,
    # limits, working directory); a lab names its namespaces by pid and a per-process counter and keeps its nft
    # rules inside them; its children get PDEATHSIG from the lab's own spawner thread, not from a test thread.
    cargo test --locked --no-fail-fast "$@"
fi
