//! Long flows stay on the fast path (issue 9, tests 6), in `established` mode:
//! - most packets of a long TCP stream and of a two-way UDP flow take the fast path:
//!   each direction's fwd counters grow by at least 90 % of the packets the sending pod
//!   put out (counted by the pod's own OUTPUT chain, so the count is exact);
//! - a flow that lasts longer than its conntrack timeout keeps its entry: fast-path
//!   packets do not refresh conntrack, the programs do (`ct_refresh`). The timeouts are
//!   lowered to 8 s in both node namespaces before the agents start (the agent reads
//!   them at start), the flows run about 25 s, and at the end each node still lists the
//!   entry, made at the flow's start (its `delta-time` age is more than two timeouts:
//!   an entry that had expired and been picked up again would be younger), while
//!   `pass_ct_new` did not grow once the flow was accepted.
//!
//! TIME_WAIT and CLOSE keep their defaults (120 s, 10 s), longer than the lowered
//! established timeout: a TCP entry with at most the closing threshold left is never
//! refreshed, so the agent must keep that threshold below the refresh one (before
//! 635ad26 it was max(time_wait, close) and this test failed: no refresh, the entry
//! expired every 8 s).

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hgw_tests::{
    Lab, Pod, Status, add_kube_proxy_invalid_drop, conntrack_entries, count_sent_packets, counter,
    in_netns, invalid_drops, paced_tcp_stream, run_in_ok, sent_packets, set_sysctls,
};

/// The lowered established / UDP timeouts, seconds.
const TIMEOUT: u64 = 8;
/// When the first counter snapshot is taken: the flow has been accepted by then.
const SETTLE: Duration = Duration::from_secs(2);
/// From the first snapshot to the last, while the flow still runs: more than two
/// timeouts.
const WATCH: Duration = Duration::from_secs(19);
const PORT: u16 = 5401;

#[test]
fn a_long_tcp_stream_stays_on_the_fast_path() -> anyhow::Result<()> {
    let lab = lab()?;
    let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let port = PORT.to_string();
    count_sent_packets(
        &a.ns,
        &["-p", "tcp", "-d", &b.ip.to_string(), "--dport", &port],
    )?;
    count_sent_packets(
        &b.ns,
        &["-p", "tcp", "-d", &a.ip.to_string(), "--sport", &port],
    )?;
    let start = Start::take(&lab, a, b)?;
    // 4 KiB every 10 ms (at least 25 s): longer than SETTLE + WATCH.
    let watched = paced_tcp_stream(&a.ns, &b.ns, b.ip, PORT, 2500, || watch(&lab, "tcp", PORT))?;
    check(&lab, a, b, &start, &watched, "tcp")
}

#[test]
fn a_long_two_way_udp_flow_stays_on_the_fast_path() -> anyhow::Result<()> {
    let lab = lab()?;
    let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let port = PORT.to_string();
    count_sent_packets(
        &a.ns,
        &["-p", "udp", "-d", &b.ip.to_string(), "--dport", &port],
    )?;
    count_sent_packets(
        &b.ns,
        &["-p", "udp", "-d", &a.ip.to_string(), "--sport", &port],
    )?;
    let start = Start::take(&lab, a, b)?;
    let (watched, sent, echoed) = udp_echo_flow(a, b, PORT, SETTLE + WATCH + SETTLE, || {
        watch(&lab, "udp", PORT)
    })?;
    eprintln!("udp: {sent} datagrams sent, {echoed} echoes came back");
    ensure!(
        echoed * 100 >= sent * 99,
        "only {echoed} of {sent} datagrams came back"
    );
    check(&lab, a, b, &start, &watched, "udp")
}

/// Two nodes with a pod each, conntrack timeouts lowered and timestamps on, kube-proxy's
/// INVALID drop, agents in `established` mode.
fn lab() -> anyhow::Result<Lab> {
    let mut lab = Lab::up(2, 1)?;
    let t = TIMEOUT.to_string();
    for node in &lab.nodes {
        set_sysctls(
            &node.ns,
            &[
                ("net.netfilter.nf_conntrack_tcp_timeout_established", &t),
                ("net.netfilter.nf_conntrack_udp_timeout", &t),
                ("net.netfilter.nf_conntrack_udp_timeout_stream", &t),
                // Entries made from now on carry their start time (`delta-time`).
                ("net.netfilter.nf_conntrack_timestamp", "1"),
            ],
        )?;
        add_kube_proxy_invalid_drop(&node.ns)?;
    }
    for pod in [&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]] {
        // One segment per skb: packets ~ segments, thousands of them.
        run_in_ok(&pod.ns, "ip", &["link", "set", "eth0", "gso_max_segs", "1"])?;
    }
    for node in 0..2 {
        lab.start_agent(node, &["--fast-path", "established"])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(Duration::from_secs(15))?;
    }
    Ok(lab)
}

/// Counters and pod packet counts before the flow.
struct Start {
    statuses: Vec<Status>,
    sent_a: u64,
    sent_b: u64,
}

impl Start {
    fn take(lab: &Lab, a: &Pod, b: &Pod) -> anyhow::Result<Start> {
        Ok(Start {
            statuses: lab.statuses()?,
            sent_a: sent_packets(&a.ns)?,
            sent_b: sent_packets(&b.ns)?,
        })
    }
}

/// What [`watch`] saw while the flow ran.
struct Watched {
    first: Vec<Status>,
    last: Vec<Status>,
    /// Per node: the flow's conntrack entry's age and state line at the last snapshot.
    entries: Vec<Vec<hgw_tests::CtEntry>>,
}

/// Runs during the flow: a snapshot after [`SETTLE`], another [`WATCH`] later, and the
/// flow's conntrack entries on each node then.
fn watch(lab: &Lab, proto: &str, port: u16) -> anyhow::Result<Watched> {
    thread::sleep(SETTLE);
    let first = lab.statuses()?;
    thread::sleep(WATCH);
    let last = lab.statuses()?;
    let entries = lab
        .nodes
        .iter()
        .map(|n| conntrack_entries(&n.ns, proto, port))
        .collect::<anyhow::Result<_>>()?;
    Ok(Watched {
        first,
        last,
        entries,
    })
}

fn check(
    lab: &Lab,
    a: &Pod,
    b: &Pod,
    start: &Start,
    w: &Watched,
    proto: &str,
) -> anyhow::Result<()> {
    let end = lab.statuses()?;
    let sent_a = sent_packets(&a.ns)? - start.sent_a;
    let sent_b = sent_packets(&b.ns)? - start.sent_b;
    let whole =
        |node: usize, name: &str| counter(&end[node], name) - counter(&start.statuses[node], name);
    let watched =
        |node: usize, name: &str| counter(&w.last[node], name) - counter(&w.first[node], name);
    for node in 0..2 {
        eprintln!(
            "{proto} n{}: fwd_to_peer +{} fwd_to_pod +{} pass_ct_new +{} (+{} while watched) ct_refresh +{} (+{} while watched); sent a {sent_a} b {sent_b}; entries {:?}",
            node + 1,
            whole(node, "ipv4.fwd_to_peer"),
            whole(node, "ipv4.fwd_to_pod"),
            whole(node, "ipv4.pass_ct_new"),
            watched(node, "ipv4.pass_ct_new"),
            whole(node, "ipv4.ct_refresh"),
            watched(node, "ipv4.ct_refresh"),
            w.entries[node],
        );
    }
    for (what, got, sent) in [
        ("n1 fwd_to_peer", whole(0, "ipv4.fwd_to_peer"), sent_a),
        ("n2 fwd_to_pod", whole(1, "ipv4.fwd_to_pod"), sent_a),
        ("n2 fwd_to_peer", whole(1, "ipv4.fwd_to_peer"), sent_b),
        ("n1 fwd_to_pod", whole(0, "ipv4.fwd_to_pod"), sent_b),
    ] {
        ensure!(
            got * 10 >= sent * 9,
            "{proto}: {what} grew by {got}, less than 90 % of the {sent} packets sent that way"
        );
    }
    ensure!(
        sent_a + sent_b >= 2000,
        "{proto}: only {} packets counted: the flow did not run as meant",
        sent_a + sent_b
    );
    for node in 0..2 {
        let name = &lab.nodes[node].ns;
        // Once accepted, no packet of the flow found its entry missing or unaccepted.
        ensure!(
            watched(node, "ipv4.pass_ct_new") == 0,
            "{proto} {name}: pass_ct_new grew by {} during the flow: its entry lapsed",
            watched(node, "ipv4.pass_ct_new")
        );
        // The entry outlived two timeouts only by being refreshed at least twice.
        ensure!(
            watched(node, "ipv4.ct_refresh") >= 2,
            "{proto} {name}: ct_refresh grew by {} over {WATCH:?} with a {TIMEOUT} s timeout",
            watched(node, "ipv4.ct_refresh")
        );
        let entries = &w.entries[node];
        ensure!(
            entries.len() == 1,
            "{proto} {name}: expected the flow's one conntrack entry, found {entries:?}"
        );
        let age = entries[0]
            .age
            .with_context(|| format!("{name}: no delta-time in {}", entries[0].line))?;
        ensure!(
            age > 2 * TIMEOUT,
            "{proto} {name}: the entry is {age} s old, younger than the flow: it expired and was made again ({})",
            entries[0].line
        );
    }
    for node in &lab.nodes {
        let drops = invalid_drops(&node.ns)?;
        ensure!(
            drops == 0,
            "{}: the INVALID rule dropped {drops} packets",
            node.ns
        );
    }
    Ok(())
}

/// A two-way UDP flow for `duration`: pod `a` sends a numbered datagram every 10 ms to
/// `b`:`port`, where a server echoes each back. Runs `during` meanwhile; returns what it
/// returned, the datagrams sent and the distinct echoes received.
fn udp_echo_flow<T: Send>(
    a: &Pod,
    b: &Pod,
    port: u16,
    duration: Duration,
    during: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<(T, u64, u64)> {
    let addr = SocketAddr::from((b.ip, port));
    let server = in_netns(&b.ns, || UdpSocket::bind(addr))?.context("binding the server")?;
    let client = in_netns(&a.ns, || UdpSocket::bind((a.ip, 0)))?.context("binding the client")?;
    client.connect(addr).context("connecting the client")?;
    for s in [&server, &client] {
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
    }
    let stop = AtomicBool::new(false);
    let echoed = Mutex::new(HashSet::new());
    thread::scope(|scope| {
        let echo = scope.spawn(|| -> anyhow::Result<()> {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                match server.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        server.send_to(&buf[..n], from).context("echoing")?;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("server receiving"),
                }
            }
            Ok(())
        });
        let receiver = scope.spawn(|| -> anyhow::Result<()> {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                match client.recv(&mut buf) {
                    Ok(8) => {
                        let seq = u64::from_be_bytes(buf[..8].try_into()?);
                        echoed
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .insert(seq);
                    }
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("client receiving"),
                }
            }
            Ok(())
        });
        let sender = scope.spawn(|| -> anyhow::Result<u64> {
            let started = Instant::now();
            let mut seq = 0u64;
            while started.elapsed() < duration {
                client.send(&seq.to_be_bytes()).context("client sending")?;
                seq += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Ok(seq)
        });
        let result = during();
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        // Stragglers: the last echoes are a round trip behind.
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let echo = echo.join().map_err(|_| anyhow::anyhow!("echo panicked"))?;
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        let (result, sent) = (result?, sent?);
        echo?;
        received?;
        let echoed = echoed
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .len() as u64;
        Ok((result, sent, echoed))
    })
}
