#!/usr/bin/env bash
# Tell staybound that the logical host of one or more services has moved, so it declares the failover now
# instead of waiting for its own detection: POST /failover/{service} on staybound's admin endpoint.
#
# Usage: staybound-failover.sh SERVICE...
#
# Call it from whatever moves the logical host (a cluster manager's notify hook, a runbook). It must reach the
# admin endpoint of every staybound whose clients use that host:
#   - on the client host itself (the default, 127.0.0.1:9901), when the cluster manager's event is seen there;
#   - or on the cluster nodes, listing the client hosts' admin addresses in STAYBOUND_ADMIN; their staybound
#     must then listen for admin on an address the nodes can reach (`[admin] listen` in staybound.toml).
#
# Environment:
#   STAYBOUND_ADMIN        admin address(es), space- or comma-separated: HOST:PORT, [IPv6]:PORT or
#                          http://HOST:PORT (default 127.0.0.1:9901)
#   STAYBOUND_TIMEOUT      seconds allowed for one request (default 2)
#   STAYBOUND_RETRIES      attempts per service and address (default 3)
#   STAYBOUND_RETRY_DELAY  seconds between attempts (default 0.5)
#   STAYBOUND_TOKEN_FILE   a file holding the bearer token of `[admin] token_file` (required when staybound's
#                          admin listens beyond loopback). The token is read by the shell and handed to curl
#                          on its standard input, never on a command line that `ps` would show.
#
# Uses curl when present, else bash's /dev/tcp. Logs to syslog (logger, facility daemon) and to stderr.
# Exit status: 0 when every POST was answered 202 (or 429: a failover of that service was declared within
# `[admin] failover_rate`, by another node's notify for the same move); 1 when an admin endpoint does not know
# a service (404); 2 when an endpoint could not be reached or answered something else after the retries (401:
# a missing or wrong token); 64 on bad usage.
set -uo pipefail

PROG=staybound-failover
ADMINS=${STAYBOUND_ADMIN:-127.0.0.1:9901}
TIMEOUT=${STAYBOUND_TIMEOUT:-2}
RETRIES=${STAYBOUND_RETRIES:-3}
RETRY_DELAY=${STAYBOUND_RETRY_DELAY:-0.5}
TOKEN_FILE=${STAYBOUND_TOKEN_FILE:-}
TOKEN=

log() { # log PRIORITY MESSAGE
    local pri=$1
    shift
    printf '%s: %s\n' "$PROG" "$*" >&2
    if command -v logger >/dev/null 2>&1; then logger -t "$PROG" -p "daemon.$pri" -- "$*" 2>/dev/null || true; fi
}

usage() { sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' >&2; }

# post_curl URL: prints the HTTP status code, or 000 when there was no answer. The token, if any, goes to curl
# as a config line on its standard input (printf is a shell builtin: no process shows it).
post_curl() {
    local header=
    [[ -z $TOKEN ]] || header="header = \"Authorization: Bearer $TOKEN\""
    printf '%s\n' "$header" |
        curl --config - --silent --output /dev/null --write-out '%{http_code}' --request POST --data '' \
            --connect-timeout "$TIMEOUT" --max-time "$TIMEOUT" --user-agent "$PROG" "$1" 2>/dev/null || true
}

# post_devtcp HOST PORT PATH: the same without curl, over bash's /dev/tcp.
post_devtcp() {
    # The token comes on standard input, not as an argument.
    # shellcheck disable=SC2016 # expanded by the inner bash, from its own arguments
    local script='
        IFS= read -r token || true
        auth=
        [[ -z $token ]] || auth="Authorization: Bearer $token"
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\n%s%bContent-Length: 0\r\nConnection: close\r\n\r\n" \
            "$3" "$4" "$5" "$auth" "${auth:+\r\n}" >&3 || exit 1
        IFS=" " read -r -t "$6" _ code _ <&3 || exit 1
        printf "%s" "${code//[!0-9]/}"'
    local hostport=$1:$2 out
    [[ $1 != *:* ]] || hostport="[$1]:$2"
    if command -v timeout >/dev/null 2>&1; then
        out=$(timeout "$TIMEOUT" bash -c "$script" _ "$1" "$2" "$3" "$hostport" "$PROG" "$TIMEOUT" 2>/dev/null \
            <<<"$TOKEN")
    else
        out=$(bash -c "$script" _ "$1" "$2" "$3" "$hostport" "$PROG" "$TIMEOUT" 2>/dev/null <<<"$TOKEN")
    fi
    [[ $out =~ ^[0-9]{3}$ ]] && printf '%s' "$out" || printf '000'
}

# failover ADMIN SERVICE: returns 0 on 202, 1 on 404, 2 otherwise.
failover() {
    local admin=${1#http://} service=$2 host port code attempt
    admin=${admin%/}
    if [[ $admin == \[*\]:* ]]; then
        host=${admin%%]*}
        host=${host#[}
        port=${admin##*]:}
    else
        host=${admin%:*}
        port=${admin##*:}
    fi
    if [[ -z $host || ! $port =~ ^[0-9]+$ || $admin != *:* ]]; then
        log err "bad admin address '$1' (want HOST:PORT)"
        return 2
    fi
    for ((attempt = 1; attempt <= RETRIES; attempt++)); do
        if command -v curl >/dev/null 2>&1; then
            code=$(post_curl "http://$admin/failover/$service")
        else
            code=$(post_devtcp "$host" "$port" "/failover/$service")
        fi
        case $code in
            202)
                log notice "failover of '$service' declared at $admin"
                return 0 ;;
            404)
                log err "$admin does not know the service '$service' (404)"
                return 1 ;;
            429)
                log notice "failover of '$service' already declared at $admin within its failover_rate (429)"
                return 0 ;;
            401)
                log err "$admin refused the token for '$service' (401): set STAYBOUND_TOKEN_FILE to the file" \
                    "named by [admin] token_file" ;;
            000) log warning "$admin: no answer (attempt $attempt of $RETRIES)" ;;
            *) log warning "$admin answered $code for '$service' (attempt $attempt of $RETRIES)" ;;
        esac
        # A 4xx other than 404 will not change on a retry.
        [[ $code != 4?? ]] || break
        ((attempt == RETRIES)) || sleep "$RETRY_DELAY"
    done
    log err "failover of '$service' NOT declared at $admin (last answer: $code)"
    return 2
}

main() {
    if (($# == 0)); then
        usage
        return 64
    fi
    case $1 in -h | --help) usage; return 0 ;; esac
    local service admin rc=0 r
    for service in "$@"; do
        # The service name rules of staybound.toml; anything else cannot be a service and must not reach a URL.
        if [[ ! $service =~ ^[a-z0-9_-]+$ ]]; then
            log err "not a service name: '$service' (names are [a-z0-9_-]+)"
            return 64
        fi
    done
    if [[ ! $TIMEOUT =~ ^[0-9]+(\.[0-9]+)?$ || ! $RETRIES =~ ^[1-9][0-9]*$ ]]; then
        log err "STAYBOUND_TIMEOUT must be a number of seconds and STAYBOUND_RETRIES at least 1"
        return 64
    fi
    if [[ -n $TOKEN_FILE ]]; then
        if [[ ! -r $TOKEN_FILE ]]; then
            log err "STAYBOUND_TOKEN_FILE $TOKEN_FILE cannot be read"
            return 64
        fi
        # The shell reads it (no cat process); surrounding whitespace is not part of the token, as for staybound.
        TOKEN=$(<"$TOKEN_FILE")
        TOKEN=${TOKEN//[[:space:]]/}
        if [[ ! $TOKEN =~ ^[A-Za-z0-9._~+/-]+=*$ ]]; then
            log err "STAYBOUND_TOKEN_FILE $TOKEN_FILE does not hold a bearer token"
            return 64
        fi
    fi
    local -a admins
    read -r -a admins <<<"${ADMINS//,/ }"
    if ((${#admins[@]} == 0)); then
        log err "STAYBOUND_ADMIN is empty"
        return 64
    fi
    for admin in "${admins[@]}"; do
        for service in "$@"; do
            failover "$admin" "$service"
            r=$?
            # The worst outcome wins: 2 (unreachable) over 1 (unknown service) over 0.
            ((r <= rc)) || rc=$r
        done
    done
    return "$rc"
}

main "$@"
