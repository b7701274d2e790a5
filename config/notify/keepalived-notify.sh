#!/usr/bin/env bash
# keepalived notify script: when a VRRP instance (or sync group) carrying a logical host changes hands, tell
# staybound, through staybound-failover.sh beside this script, so it declares the failover at once.
#
# keepalived.conf:
#   vrrp_instance VI_DB {
#       ...
#       notify "/usr/local/lib/staybound/keepalived-notify.sh orders"
#   }
# keepalived appends TYPE NAME STATE [PRIORITY] to the configured command, so the script is called as
#   keepalived-notify.sh [--admin ADDR]... [--token-file FILE] [--on both|gain|loss] SERVICE... TYPE NAME STATE
#                        [PRIORITY]
# SERVICE... are the staybound services whose upstream is this instance's address (or STAYBOUND_SERVICES).
# Use `notify`, not notify_master/notify_backup/notify_fault: those do not pass the state.
#
# When does the logical host move? When this node gains MASTER (the address arrived here) or leaves it for
# BACKUP, FAULT or STOP (the address left). Transitions between BACKUP and FAULT, and keepalived starting in
# BACKUP, move nothing and are ignored: announcing them would reset healthy sessions. Telling a loss from a
# non-event needs the previous state, which the script keeps in STAYBOUND_NOTIFY_STATE_DIR.
#
# Where it runs:
#   - On the cluster nodes (the usual case: keepalived runs where the service runs). staybound runs on the
#     client hosts, so name their admin addresses (--admin, or STAYBOUND_ADMIN) and let those staybound
#     listen for admin on an address the nodes reach (`[admin] listen`, firewalled to the nodes, with
#     `[admin] token_file`: give the same token to this script with --token-file). When every
#     node runs the script, the node that takes over announces the move; `--on gain` avoids a second
#     announcement by the node that lost the address, `both` (the default) also covers a new master that
#     cannot reach the client hosts.
#   - On a client host that runs keepalived itself (it is one of the instance's members): the default
#     admin address, 127.0.0.1:9901, is right, and `both` is needed, since the host only sees its own side.
#
# Environment (keepalived may run scripts with a bare environment: prefer the options):
#   STAYBOUND_ADMIN              admin address(es) (default 127.0.0.1:9901); --admin adds to a list that
#                                replaces it
#   STAYBOUND_SERVICES           services, when none are given as arguments
#   STAYBOUND_TOKEN_FILE         the file holding the admin bearer token (see staybound-failover.sh);
#                                --token-file overrides it. Only the path is ever on a command line.
#   STAYBOUND_NOTIFY_ON          both | gain | loss (default both); --on overrides it
#   STAYBOUND_NOTIFY_STATE_DIR   where the last state of each instance is kept (default /run/staybound-notify)
#   STAYBOUND_FAILOVER           the failover command (default staybound-failover.sh beside this script)
#   STAYBOUND_TIMEOUT, STAYBOUND_RETRIES, STAYBOUND_RETRY_DELAY: see staybound-failover.sh
#
# Exit status: that of staybound-failover.sh when it ran, 0 when nothing moved, 64 on bad usage.
set -uo pipefail

PROG=staybound-keepalived
STATE_DIR=${STAYBOUND_NOTIFY_STATE_DIR:-/run/staybound-notify}
ON=${STAYBOUND_NOTIFY_ON:-both}
FAILOVER=${STAYBOUND_FAILOVER:-$(dirname "${BASH_SOURCE[0]}")/staybound-failover.sh}

log() { # log PRIORITY MESSAGE
    local pri=$1
    shift
    printf '%s: %s\n' "$PROG" "$*" >&2
    if command -v logger >/dev/null 2>&1; then logger -t "$PROG" -p "daemon.$pri" -- "$*" 2>/dev/null || true; fi
}

usage() {
    log err "usage: keepalived-notify.sh [--admin ADDR]... [--token-file FILE] [--on both|gain|loss] SERVICE..." \
        "TYPE NAME STATE [PRIORITY]" \
        "(configure it as keepalived's \`notify\` script)"
}

main() {
    local admins=() args n type name state prio=
    while (($#)); do
        case $1 in
            --admin) (($# >= 2)) || { usage; return 64; }; admins+=("$2"); shift 2 ;;
            --on) (($# >= 2)) || { usage; return 64; }; ON=$2; shift 2 ;;
            --token-file) (($# >= 2)) || { usage; return 64; }; export STAYBOUND_TOKEN_FILE=$2; shift 2 ;;
            *) break ;;
        esac
    done
    case $ON in both | gain | loss) ;; *) log err "--on must be both, gain or loss, not '$ON'"; return 64 ;; esac

    # TYPE NAME STATE [PRIORITY] are the last three or four arguments; what precedes them are services.
    args=("$@")
    n=$#
    if ((n >= 4)) && [[ ${args[n - 4]} == INSTANCE || ${args[n - 4]} == GROUP ]]; then
        type=${args[n - 4]} name=${args[n - 3]} state=${args[n - 2]} prio=${args[n - 1]}
        args=("${args[@]:0:n-4}")
    elif ((n >= 3)) && [[ ${args[n - 3]} == INSTANCE || ${args[n - 3]} == GROUP ]]; then
        type=${args[n - 3]} name=${args[n - 2]} state=${args[n - 1]}
        args=("${args[@]:0:n-3}")
    else
        usage
        return 64
    fi
    if ((${#args[@]} == 0)); then
        local services=${STAYBOUND_SERVICES:-}
        read -r -a args <<<"${services//,/ }"
    fi
    if ((${#args[@]} == 0)); then
        log err "$type $name: no staybound services given (arguments or STAYBOUND_SERVICES)"
        return 64
    fi

    # The previous state of this instance, and the new one recorded for next time.
    local key prev='' file=''
    key=$(printf '%s-%s' "$type" "$name" | tr -c 'A-Za-z0-9_.-' '_')
    if { [[ -d $STATE_DIR ]] || mkdir -m 0700 "$STATE_DIR"; } 2>/dev/null && [[ -w $STATE_DIR ]]; then
        file=$STATE_DIR/$key
        [[ ! -f $file ]] || prev=$(<"$file")
        printf '%s\n' "$state" >"$file" || file=''
    fi
    [[ -n $file ]] || log warning "cannot keep state in $STATE_DIR: leaving MASTER will not be noticed"

    local what=''
    if [[ $state == MASTER && $prev != MASTER ]]; then
        what=gain
    elif [[ $prev == MASTER && $state != MASTER ]]; then
        what=loss
    fi
    if [[ -z $what ]]; then
        log info "$type $name: ${prev:-start} -> $state${prio:+ (priority $prio)}: the address did not move"
        return 0
    fi
    if [[ $ON != both && $ON != "$what" ]]; then
        log info "$type $name: ${prev:-start} -> $state: $what of the address, not announced (--on $ON)"
        return 0
    fi
    log notice "$type $name: ${prev:-start} -> $state${prio:+ (priority $prio)}: the address moved," \
        "declaring a failover of ${args[*]}"
    if ((${#admins[@]})); then
        STAYBOUND_ADMIN=${admins[*]} "$FAILOVER" "${args[@]}"
    else
        "$FAILOVER" "${args[@]}"
    fi
}

main "$@"
