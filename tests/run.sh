#!/usr/bin/env bash
# The project's one test command, for a fresh Debian 12 machine (and CI, through .ci/run).
#
#   ./tests/run.sh                 everything
#   ./tests/run.sh --test ldap     extra arguments go to `cargo test`
#   FUZZ_SECONDS=60 ./tests/run.sh each fuzz target runs that long (default 20 s)
#
# 1. Installs what the tests need when it is missing: slapd and ldap-utils, Samba's AD DC
#    (the integration tests start their own throwaway directory servers), openssl, curl, and
#    the rustfmt/clippy components.
# 2. cargo fmt --check; cargo clippy (all targets, warnings are errors); cargo test (unit and
#    integration tests); the criterion benchmarks once each in test mode, so they keep
#    compiling and working. Everything builds with the release profile, so dependencies are
#    compiled once for tests and benches alike.
# 3. Prints each step's wall time, the total, and one closing line with the test counts.
#    A failed check does not stop the later ones; the exit status is the first failure's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# slapd, ldap-utils: tests/support/slapd.rs (a throwaway OpenLDAP per test).
# samba ... krb5-user: tests/support/samba.rs (a Samba AD DC for tests/mapping_ad.rs); the
# provisioning data and the DC's VFS modules are only Recommends of samba, so named here.
# openssl, curl: tests/gateway.rs and tests/cli.rs call them.
# nginx, haproxy: the peers of the fleet benchmark (benches/fleet.rs).
# prometheus (server and promtool), systemd (systemd-analyze), python3-venv: tests/prometheus.rs
# and tests/deploy_checks.sh (rules, dashboard, unit file, Kubernetes schemas, Containerfile).
# sogo ... memcached: tests/support/sogo.rs (a real ActiveSync server for
# tests/activesync_sogo.rs, with its own PostgreSQL, Dovecot and memcached).
# libgssapi-krb5-2: MIT's GSSAPI library, which seg opens at run time in Kerberos mode
# (tests/kerberos.rs, the gss unit tests); nothing Kerberos is needed to build seg.
# apache2, libapache2-mod-auth-gssapi: the Negotiate acceptor of tests/kerberos.rs and SOGo's
# Kerberos front in tests/activesync_kerberos.rs.
# slowhttptest: the slowloris / slow body / slow read tool run against seg by
# tests/slow_clients.rs.
# logrotate: rotates seg's audit file in tests/audit_log.rs (create and copytruncate).
# redis-server: the store the replicas of tests/fleet.rs share ([fleet]).
# chromium: the headless browser tests/status_page.rs drives over the DevTools protocol;
# fonts-liberation: the fonts it renders the page (and its screenshot) with, a recommends
# that --no-install-recommends would leave out.
APT_PACKAGES=(
    libgssapi-krb5-2 apache2 libapache2-mod-auth-gssapi
    slapd ldap-utils
    samba samba-dsdb-modules samba-vfs-modules samba-ad-provision ldb-tools krb5-user
    openssl curl
    sogo sogo-activesync postgresql dovecot-imapd memcached
    nginx haproxy
    prometheus systemd python3-venv
    slowhttptest logrotate redis-server chromium fonts-liberation
)
# The real ActiveSync client the SOGo test drives (tests/eas_client.py).
PIP_PACKAGES=(pyactivesync==0.17.0)

now() { date +%s%N; }
secs() { awk -v ns="$1" 'BEGIN { printf "%.1f s", ns / 1e9 }'; }

T0=$(now)
STEP_NAMES=()
STEP_TIMES=()
STEP_RESULTS=()
TEST_LOG=
POLICY_RC_D=

summary() {
    local i
    echo
    echo "==> timings"
    for i in "${!STEP_NAMES[@]}"; do
        printf '    %-8s %10s  %s\n' "${STEP_RESULTS[$i]}" "$(secs "${STEP_TIMES[$i]}")" "${STEP_NAMES[$i]}"
    done
    printf '    %-8s %10s\n' "total" "$(secs $(($(now) - T0)))"
    if [[ -n "$TEST_LOG" && -s "$TEST_LOG" ]]; then
        # The totals of every `test result:` line cargo test printed.
        awk '/^test result: / {
                for (i = 1; i <= NF; i++) {
                    if ($(i + 1) ~ /^passed/) p += $i
                    if ($(i + 1) ~ /^failed/) f += $i
                    if ($(i + 1) ~ /^ignored/) s += $i
                }
                n++
             }
             END { if (n) printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$TEST_LOG"
    fi
}

on_exit() {
    local rc=$?
    if [[ -n "$POLICY_RC_D" ]]; then
        rm -f "$POLICY_RC_D"
    fi
    if [[ -n "$TEST_LOG" ]]; then
        rm -f "$TEST_LOG"
    fi
    exit "$rc"
}
trap on_exit EXIT

# step [--fatal] NAME COMMAND...: runs one step with a header line and records its wall
# time. A failed step is reported and the later steps still run (one run shows every
# problem, a formatting slip does not hide test results); the script then exits non-zero.
# --fatal stops at once (the installs: nothing after them can work without them).
# The command runs in an `||` context, where `set -e` does not apply: the step functions
# below return on their own errors.
FIRST_FAILURE=0
step() {
    local fatal=0 name start rc=0
    if [[ $1 == --fatal ]]; then
        fatal=1
        shift
    fi
    name=$1
    shift
    echo
    echo "==> [$((${#STEP_NAMES[@]} + 1))] $name"
    start=$(now)
    "$@" || rc=$?
    STEP_NAMES+=("$name")
    STEP_TIMES+=($(($(now) - start)))
    if ((rc == 0)); then
        STEP_RESULTS+=("ok")
        return 0
    fi
    STEP_RESULTS+=("FAILED")
    echo "==> $name failed (exit $rc)" >&2
    ((FIRST_FAILURE != 0)) || FIRST_FAILURE=$rc
    if ((fatal)); then
        summary
        exit "$rc"
    fi
}

missing_packages() {
    local pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        if [[ "$status" != "installed" ]]; then
            echo "$pkg"
        fi
    done
}

install_packages() {
    local missing
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "no dpkg here: make sure the equivalents of ${APT_PACKAGES[*]} are installed"
        return 0
    fi
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]} == 0)); then
        echo "already installed: ${APT_PACKAGES[*]}"
        return 0
    fi
    if ((EUID != 0)); then
        echo "missing Debian packages: ${missing[*]}; as root, run:" >&2
        echo "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
        return 1
    fi
    # Debian's slapd and samba start system daemons on install; the tests run their own, so
    # forbid service starts for the duration (policy-rc.d exit 101: "action forbidden").
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        POLICY_RC_D=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC_D" || return
        chmod +x "$POLICY_RC_D" || return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || return
    apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" || return
    if [[ -n "$POLICY_RC_D" ]]; then
        rm -f "$POLICY_RC_D"
        POLICY_RC_D=
    fi
}

install_python_packages() {
    if python3 -c 'import pyactivesync' >/dev/null 2>&1; then
        echo "already installed: ${PIP_PACKAGES[*]}"
        return 0
    fi
    python3 -m pip install -q "${PIP_PACKAGES[@]}" || return
}

install_rust_components() {
    local components=()
    cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
    if ((${#components[@]} == 0)); then
        echo "already installed: rustfmt, clippy"
        return 0
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        echo "missing Rust components (${components[*]}) and no rustup to add them" >&2
        return 1
    fi
    rustup component add "${components[@]}" || return
}

install_cargo_fuzz() {
    if cargo fuzz --version >/dev/null 2>&1; then
        echo "already installed: $(cargo fuzz --version)"
        return 0
    fi
    cargo install -q --locked cargo-fuzz || return
}

run_tests() {
    TEST_LOG=$(mktemp) || return
    # --no-fail-fast: every test binary runs, so one report names every failure.
    cargo test --release --no-fail-fast "$@" 2>&1 | tee "$TEST_LOG"
}

step --fatal "install Debian packages" install_packages
step --fatal "install Python packages" install_python_packages
step --fatal "install rustfmt and clippy" install_rust_components
step "cargo fmt --check" cargo fmt --check
step "cargo clippy --release --all-targets -- -D warnings" \
    cargo clippy --release --all-targets -- -D warnings
step "cargo test --release $*" run_tests "$@"
step "deploy checks (tests/deploy_checks.sh)" bash tests/deploy_checks.sh
step "cargo bench --bench identity -- --test" cargo bench --bench identity -- --test
step "cargo bench --bench crl -- --test" cargo bench --bench crl -- --test
step "cargo bench --bench kerberos -- --test" cargo bench --bench kerberos -- --test
# The device-fleet benchmark against nginx and HAProxy, short form (under 2 minutes), so it
# keeps working; its table goes to the log and target/fleet/report.json.
step "cargo bench --bench fleet -- --quick" cargo bench --bench fleet -- --quick
step "install cargo-fuzz" install_cargo_fuzz
# Every fuzz target for a fixed time over its seed corpus and its regressions (fuzz/run.sh).
step "fuzz/run.sh (FUZZ_SECONDS=${FUZZ_SECONDS:-20} each)" bash fuzz/run.sh
summary
exit "$FIRST_FAILURE"
