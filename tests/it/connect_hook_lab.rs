//! Transparent mode by the connect hook (`[intercept] method = "connect"`) in the namespace lab: the
//! unmodified client dials the logical host's address, and the eBPF programs staybound attaches to the
//! cgroup v2 root rewrite that `connect()` to its listener; no nftables rule and no NAT are involved. The
//! same checks as through the nftables redirect (a silent move within the bound, nothing lost through a 2 s
//! switchover, the `source` address), and the hook's life: it ends with the process however it ends
//! (SIGTERM, SIGKILL), follows reloads (to the nftables method and back) and upgrades, and leaves every
//! other network namespace alone.

use crate::support;

use std::time::Duration;

use support::lab::{Host, LOGICAL, Lab, REDIS_PORT, SIGTERM};
use support::sidecar::{
    Blocked, LISTEN, Sidecar, announced_moves, assert_announced_within_200ms, runs, two_nodes, upgrade, wait_blocked,
};
use support::transparent::{SOURCE, logical, proxied, silent_move, switchover_loses_nothing, with_source};
use support::wait::wait_until;

const SIGHUP: i32 = 1;

/// The service's keys and, after them, the top-level `[intercept]` table choosing the hook (a table header
/// is a path from the top, so it may come last).
const HOOKED: &str = "intercept = true\nsource = \"198.18.0.20\"\n[service.probe]\nneighbor = false\n[intercept]\nmethod = \"connect\"\n";

/// `ip netns exec` gives the process a sysfs of the namespace's own, without the cgroup file systems
/// mounted under it: this mounts the cgroup v2 hierarchy at /sys/fs/cgroup in that private mount namespace
/// (where a host or a container has it), then runs staybound.
const MOUNT_CGROUP2: [&str; 4] = ["sh", "-c", "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"", "sh"];

/// staybound with the hook, in the client namespace.
fn hooked(lab: &Lab) -> Sidecar<'_> {
    Sidecar::start_as(lab, &MOUNT_CGROUP2, &format!("listen = \"{LISTEN}\"\n"), HOOKED)
}

fn nft_ruleset(lab: &Lab) -> String {
    String::from_utf8_lossy(&lab.exec(Host::Client, &["nft", "list", "ruleset"]).stdout).to_string()
}

/// Which node answers a client in the client namespace that dials the logical host (through staybound or
/// not), by its redis run id.
fn answering(lab: &Lab) -> Option<String> {
    lab.redis_run_id(Host::Client, LOGICAL)
}

#[test]
fn a_client_dialling_the_logical_host_learns_of_a_silent_move_through_the_connect_hook() {
    for run in 0..runs() {
        let Some(lab) = two_nodes("hook-move") else { return };
        with_source(&lab);
        let sc = hooked(&lab);
        sc.wait_state("up", Duration::from_secs(5));
        let st = sc.status();
        assert!(
            st["intercept"]["rules"].as_str().unwrap_or("").starts_with("attached by this process: connect hook"),
            "{st}"
        );
        assert!(!nft_ruleset(&lab).contains("staybound"), "no nftables rule is involved");
        silent_move(&lab, &sc, "connect hook,", run);
    }
}

#[test]
fn a_closed_loop_client_loses_nothing_through_a_two_second_switchover_by_the_connect_hook() {
    for run in 0..runs() {
        let Some(lab) = two_nodes("hook-switch") else { return };
        with_source(&lab);
        switchover_loses_nothing(&lab, hooked, "connect hook", run);
    }
}

#[test]
fn an_announced_move_ends_the_hooked_session_within_200ms() {
    let Some(lab) = two_nodes("hook-garp") else { return };
    with_source(&lab);
    // The neighbour watch on (the default); the address moves back and forth within seconds, which is no
    // split brain to damp (as in the neighbour lab).
    let keys = "intercept = true\nsource = \"198.18.0.20\"\n[service.probe]\nsplit_brain_window = \"0s\"\n\
                [intercept]\nmethod = \"connect\"\n";
    let sc = Sidecar::start_as(&lab, &MOUNT_CGROUP2, &format!("listen = \"{LISTEN}\"\n"), keys);
    sc.wait_state("up", Duration::from_secs(5));
    wait_until("the neighbour watch runs", Duration::from_secs(5), || sc.status()["neighbor_watch"] == "watching");
    let times = announced_moves(&lab, &sc, logical(), 3 * runs(), "FIGURES connect hook, announced move");
    assert!(proxied(&sc) >= 3.0 * runs() as f64, "every blocked client came through staybound");
    assert_announced_within_200ms(times);
}

#[test]
fn an_upgrade_attaches_the_new_process_hook_before_the_old_one_goes() {
    let Some(lab) = two_nodes("hook-upgrade") else { return };
    with_source(&lab);
    let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
    let sc = hooked(&lab);
    sc.wait_state("up", Duration::from_secs(5));
    // A session made through the old process, held across the upgrade.
    let held = Blocked::start(&lab, Host::Client, logical());
    wait_blocked(&lab, Host::Node1, 1);
    let new = upgrade(&lab, sc.pid);
    // The new process writes to the same log; the old one counted one client, the new one none yet.
    wait_until("the new process attached its hook and serves the admin endpoint", Duration::from_secs(10), || {
        lab.read_log(sc.pid).matches("intercepting: connects to the upstream from this cgroup").count() >= 2
            && sc.metric_or_nan("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")])
                == 0.0
    });
    // While the old one drains its session, a new client dialling the logical host comes through the new
    // process (the old one accepts no more).
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&sc), 1.0, "through the new process");
    drop(held);
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(15)).success(), "the old process ends with its session");
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()), "through the new process once the old is gone");
    assert_eq!(proxied(&sc), 2.0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the new process exits", Duration::from_secs(10), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), None).is_err()
            || std::fs::read_to_string(format!("/proc/{new}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()), "direct after the new process's SIGTERM");
}

#[test]
fn the_connect_hook_ends_with_the_process_however_it_ends() {
    let Some(lab) = two_nodes("hook-life") else { return };
    with_source(&lab);
    let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()), "direct before staybound");

    // SIGTERM: from then on a client dialling the logical host reaches it directly.
    let sc = hooked(&lab);
    sc.wait_state("up", Duration::from_secs(5));
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&sc), 1.0, "through staybound");
    lab.signal(sc.pid, SIGTERM);
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(10)).success());
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()), "direct after SIGTERM");

    // SIGKILL: the links go with the process's descriptors; nothing is left to clean up.
    let killed = hooked(&lab);
    killed.wait_state("up", Duration::from_secs(5));
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&killed), 1.0);
    lab.kill_hard(killed.pid);
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()), "direct at once after SIGKILL, no cleanup run");
    assert!(!nft_ruleset(&lab).contains("staybound"));

    // Another network namespace is never redirected, though the hook is on the root of the cgroup tree that
    // every process of this machine is in: node 2's namespace dials the logical host and reaches node 1.
    let again = hooked(&lab);
    again.wait_state("up", Duration::from_secs(5));
    assert_eq!(lab.redis_run_id(Host::Node2, LOGICAL).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&again), 0.0, "node 2's client did not come through staybound");
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&again), 1.0, "the client namespace's did");
    lab.kill_hard(again.pid);
}

#[test]
fn the_connect_hook_survives_reloads_and_follows_a_change_of_method() {
    let Some(lab) = two_nodes("hook-reload") else { return };
    with_source(&lab);
    let sc = hooked(&lab);
    sc.wait_state("up", Duration::from_secs(5));
    let path = lab.dir().join("staybound.toml");
    let hooked = std::fs::read_to_string(&path).unwrap();
    let nat = hooked.replace("method = \"connect\"", "method = \"nat\"");
    let reloads = |n: f64| {
        wait_until("the reload is applied", Duration::from_secs(10), || {
            sc.metric("staybound_config_reloads_total", &[("result", "ok")]) >= n
        });
    };
    let check = |label: &str, hook: bool, reloads_done: f64| {
        reloads(reloads_done);
        let st = sc.status();
        let rules = st["intercept"]["rules"].as_str().unwrap_or("").to_string();
        let want = if hook { "attached by this process: connect hook" } else { "installed by this process: nftables" };
        assert!(rules.starts_with(want), "{label}: {rules}");
        assert_eq!(nft_ruleset(&lab).contains("table inet staybound"), !hook, "{label}");
        let before = proxied(&sc);
        drop(Blocked::start(&lab, Host::Client, logical()));
        assert_eq!(proxied(&sc), before + 1.0, "{label}: the client dialling the logical host came through staybound");
    };
    check("at start", true, 0.0);
    // The same file again: the hook stays as it is.
    lab.signal(sc.pid, SIGHUP);
    check("reloaded unchanged", true, 1.0);
    // To the nftables method: the hook goes once the rules are in; and back.
    std::fs::write(&path, &nat).unwrap();
    lab.signal(sc.pid, SIGHUP);
    check("reloaded to nat", false, 2.0);
    std::fs::write(&path, &hooked).unwrap();
    lab.signal(sc.pid, SIGHUP);
    check("reloaded back to connect", true, 3.0);
    // No intercept service left: the hook is detached and the client goes straight to the host.
    std::fs::write(&path, hooked.replace("intercept = true\n", "")).unwrap();
    lab.signal(sc.pid, SIGHUP);
    reloads(4.0);
    assert!(sc.status()["intercept"]["rules"].is_null(), "{}", sc.status());
    let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
    let before = proxied(&sc);
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&sc), before, "not through staybound once the hook is detached");
    lab.signal(sc.pid, SIGTERM);
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(10)).success());
    assert!(!nft_ruleset(&lab).contains("staybound"));
}

/// A cgroup the test makes under the cgroup v2 root and removes when it ends (once empty).
struct Cgroup {
    path: std::path::PathBuf,
    name: String,
}

impl Cgroup {
    fn new(tag: &str) -> Cgroup {
        let root = staybound::intercept::cgroup2_root().expect("a cgroup v2 file system is mounted");
        let name = format!("staybound-it-{}-{tag}", std::process::id());
        let path = root.join(&name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Cgroup { path, name }
    }

    /// `args` run in the client namespace from inside this cgroup (the cgroup file system mounted as
    /// `MOUNT_CGROUP2` does, so its `cgroup.procs` can be written there).
    fn run(&self, lab: &Lab, args: &str) -> String {
        let script = format!(
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup && echo $$ > /sys/fs/cgroup/{}/cgroup.procs && exec {args}",
            self.name
        );
        let out = lab.try_exec(Host::Client, &["sh", "-c", &script]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes the test ran in it have exited by now; the directory goes by its exact name.
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn a_hook_on_a_cgroup_of_its_own_takes_only_that_cgroup_by_ipv4_ipv6_and_v4_mapped() {
    let Some(lab) = two_nodes("hook-cgroup") else { return };
    with_source(&lab);
    let cg = Cgroup::new("cgroup");
    // An IPv6 upstream of the client namespace's own: redis on ::1.
    lab.spawn(Host::Client, &["redis-server", "--port", "6390", "--bind", "::1", "--save", "", "--appendonly", "no"]);
    wait_until("redis on [::1]:6390", Duration::from_secs(5), || {
        lab.try_exec(Host::Client, &["redis-cli", "-h", "::1", "-p", "6390", "PING"]).stdout.starts_with(b"PONG")
    });
    let extra = format!(
        "intercept = true\nsource = \"{SOURCE}\"\n[service.probe]\nneighbor = false\n\
         [[service]]\nname = \"v6\"\nlisten = \"[::1]:16390\"\nupstream = \"[::1]:6390\"\nintercept = true\n\
         [intercept]\nmethod = \"connect\"\ncgroup = \"/sys/fs/cgroup/{}\"\n",
        cg.name
    );
    let sc = Sidecar::start_as(&lab, &MOUNT_CGROUP2, &format!("listen = \"{LISTEN}\"\n"), &extra);
    sc.wait_state("up", Duration::from_secs(5));
    let v6 = || sc.metric("staybound_client_connections_total", &[("service", "v6"), ("outcome", "proxied")]);

    // Outside the cgroup (this test's own process): straight to the logical host.
    let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
    assert_eq!(answering(&lab).as_deref(), Some(node1.as_str()));
    assert_eq!(proxied(&sc), 0.0, "a process outside the cgroup is not redirected");
    // Inside: an IPv4 socket, then a dual-stack IPv6 socket dialling the v4-mapped address (the connect6
    // hook), then an IPv6 upstream.
    assert_eq!(cg.run(&lab, &format!("redis-cli -h {LOGICAL} -p {REDIS_PORT} PING")), "PONG");
    assert_eq!(proxied(&sc), 1.0, "IPv4, from inside the cgroup");
    let mapped = format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET6); s.connect(('::ffff:{LOGICAL}', {REDIS_PORT})); \
         s.sendall(b'PING\\r\\n'); print(s.recv(16).decode().strip(), s.getpeername()[0])\""
    );
    let out = cg.run(&lab, &mapped);
    assert!(out.starts_with("+PONG ::ffff:127.0.0.1"), "{out}");
    assert_eq!(proxied(&sc), 2.0, "v4-mapped, through the connect6 hook");
    assert_eq!(v6(), 0.0);
    assert_eq!(cg.run(&lab, "redis-cli -h ::1 -p 6390 PING"), "PONG");
    assert_eq!(v6(), 1.0, "IPv6");
    lab.signal(sc.pid, SIGTERM);
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(10)).success());
    assert_eq!(cg.run(&lab, &format!("redis-cli -h {LOGICAL} -p {REDIS_PORT} PING")), "PONG", "direct after");
}
