//! TCP connections end cleanly over the fast path, beside kube-proxy's
//! `-m conntrack --ctstate INVALID -j DROP` on both nodes (issue 9, tests 7).
//!
//! The fast path carries a connection's data past conntrack, so conntrack's idea of the
//! sequence window stops moving; a FIN or RST handed to the kernel after that would be
//! INVALID and kube-proxy would drop it: the connection would never end. hgw carries
//! FIN and RST of accepted flows itself and shortens the entry's timeout. Checked here,
//! with the answers compared to the kernel path's (`--fast-path off`) in the same lab:
//! - a 10 MB transfer that the server ends by closing its socket reaches EOF on the
//!   client, every byte intact;
//! - a connection reset by either side (SO_LINGER 0, then close) is gone on the other
//!   side too (ECONNRESET), and both nodes' conntrack entries are removed or expire
//!   within the close timeout;
//! - the entries of all those connections are gone from both nodes' conntrack once the
//!   lowered TIME_WAIT / CLOSE timeouts have passed;
//! - the INVALID rule never dropped a packet, and in `established` mode the fast path
//!   carried at least 90 % of the packets each pod sent (counted by the pod's own
//!   OUTPUT chain) and shortened entries on both nodes (`ct_close`).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hgw_tests::{
    Lab, Pod, add_kube_proxy_invalid_drop, conntrack_entries, count_sent_packets, counter,
    in_netns, invalid_drops, run_in_ok, sent_packets, set_sysctls,
};

/// The lowered conntrack timeouts (seconds) for closed connections, set in both nodes
/// before the agents start (the agent reads them at start).
const TIME_WAIT: u64 = 3;
const CLOSE: u64 = 3;
/// How long after the timeout an entry may still be listed (conntrack's GC and our
/// polling), before the test calls it stuck.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
const TRANSFER: usize = 10_000_000;
/// Bound for the whole transfer including EOF (it takes well under a second when the
/// path works), and for any single read.
const TRANSFER_BOUND: Duration = Duration::from_secs(60);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn connections_end_cleanly_beside_kube_proxys_invalid_drop() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in &lab.nodes {
        set_sysctls(
            &node.ns,
            &[
                (
                    "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
                    &TIME_WAIT.to_string(),
                ),
                (
                    "net.netfilter.nf_conntrack_tcp_timeout_close",
                    &CLOSE.to_string(),
                ),
            ],
        )?;
        add_kube_proxy_invalid_drop(&node.ns)?;
    }
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    // One segment per skb from the pods (no 64 KB GSO skbs over the veths): the
    // programs and conntrack then see every segment of the 10 MB, thousands of them.
    for pod in [&a, &b] {
        run_in_ok(&pod.ns, "ip", &["link", "set", "eth0", "gso_max_segs", "1"])?;
    }

    // The fast path first, then the kernel alone on the same lab, other ports.
    lab.start_agents(&["--fast-path", "established"], Duration::from_secs(15))?;
    let fast = run_cases(&lab, &a, &b, 5301)?;
    lab.start_agents(&["--fast-path", "off"], Duration::from_secs(15))?;
    let kernel = run_cases(&lab, &a, &b, 5311)?;

    for (mode, r) in [("established", &fast), ("off", &kernel)] {
        eprintln!("{mode}: {r:?}");
    }
    for node in 0..2 {
        // Per node: the data direction and the ACK direction both on the fast path.
        let (sent_out, sent_in) = if node == 0 {
            (fast.sent_a, fast.sent_b)
        } else {
            (fast.sent_b, fast.sent_a)
        };
        let d = &fast.deltas[node];
        for (name, got, sent) in [
            ("fwd_to_peer", d.fwd_to_peer, sent_out),
            ("fwd_to_pod", d.fwd_to_pod, sent_in),
        ] {
            assert!(
                got * 10 >= sent * 9,
                "n{}: {name} grew by {got}, less than 90 % of the {sent} packets its side sent",
                node + 1
            );
        }
        // One FIN or RST per connection shortened each node's entry: three connections.
        assert!(
            d.ct_close >= 3,
            "n{}: ct_close grew by {}, expected at least one per connection (3)",
            node + 1,
            d.ct_close
        );
        let k = &kernel.deltas[node];
        assert_eq!(
            k.fwd_to_peer + k.fwd_to_pod,
            0,
            "n{}: the fast path forwarded packets with --fast-path off",
            node + 1
        );
    }
    // Thousands of segments went both ways: enough for a sequence-window problem to show.
    assert!(
        fast.sent_a + fast.sent_b >= 1000,
        "only {} packets counted: the transfer did not run as meant",
        fast.sent_a + fast.sent_b
    );
    for node in &lab.nodes {
        let drops = invalid_drops(&node.ns)?;
        assert_eq!(
            drops, 0,
            "{}: kube-proxy's INVALID rule dropped {drops} packets: conntrack judged segments it should have accepted",
            node.ns
        );
    }
    Ok(())
}

/// Counter growth on one node during [`run_cases`].
#[derive(Debug, Default)]
struct Deltas {
    fwd_to_peer: u64,
    fwd_to_pod: u64,
    ct_close: u64,
}

/// What one mode's cases counted (their answers are asserted inside).
#[derive(Debug)]
struct Report {
    /// Packets pod a and pod b sent on the three connections (their own OUTPUT counts).
    sent_a: u64,
    sent_b: u64,
    deltas: [Deltas; 2],
}

/// Runs the three connections on ports `port`, `port + 1`, `port + 2` from pod `a` (on
/// n1) to pod `b` (on n2) and checks their answers and conntrack entries.
fn run_cases(lab: &Lab, a: &Pod, b: &Pod, port: u16) -> anyhow::Result<Report> {
    let ports = [port, port + 1, port + 2];
    for p in ports {
        let p = p.to_string();
        let to_b = ["-p", "tcp", "-d", &b.ip.to_string(), "--dport", &p];
        count_sent_packets(&a.ns, &to_b)?;
        let from_b = ["-p", "tcp", "-s", &b.ip.to_string(), "--sport", &p];
        count_sent_packets(&b.ns, &from_b)?;
    }
    let (sent_a0, sent_b0) = (sent_packets(&a.ns)?, sent_packets(&b.ns)?);
    let before = lab.statuses()?;

    let server = SocketAddr::from((b.ip, ports[0]));
    let received = transfer_then_server_closes(a, b, server)?;
    ensure!(
        received == TRANSFER,
        "client read {received} of {TRANSFER} bytes before EOF"
    );
    reset_case(lab, a, b, ports[1], Side::Server)?;
    reset_case(lab, a, b, ports[2], Side::Client)?;
    let statuses = lab.statuses()?;
    let sent_a = sent_packets(&a.ns)? - sent_a0;
    let sent_b = sent_packets(&b.ns)? - sent_b0;

    // Every entry of the three connections is gone within the lowered timeouts.
    let deadline = Instant::now() + Duration::from_secs(TIME_WAIT.max(CLOSE)) + EXPIRY_MARGIN;
    for node in &lab.nodes {
        for p in ports {
            loop {
                let left = conntrack_entries(&node.ns, "tcp", p)?;
                if left.is_empty() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{}: conntrack still holds port {p}'s entry long after the {TIME_WAIT} s / {CLOSE} s timeouts: {left:?}",
                    node.ns
                );
                thread::sleep(Duration::from_millis(250));
            }
        }
    }

    let delta = |i: usize, name: &str| counter(&statuses[i], name) - counter(&before[i], name);
    let deltas = [0, 1].map(|i| Deltas {
        fwd_to_peer: delta(i, "ipv4.fwd_to_peer"),
        fwd_to_pod: delta(i, "ipv4.fwd_to_pod"),
        ct_close: delta(i, "ipv4.ct_close"),
    });
    Ok(Report {
        sent_a,
        sent_b,
        deltas,
    })
}

/// Server in `b` writes [`TRANSFER`] bytes and closes its socket; the client in `a`
/// reads until EOF. Returns how many bytes the client read (checked against the
/// pattern); fails if EOF does not come within the bound.
fn transfer_then_server_closes(a: &Pod, b: &Pod, server: SocketAddr) -> anyhow::Result<usize> {
    let listener = in_netns(&b.ns, || TcpListener::bind(server))?.context("listening")?;
    thread::scope(|scope| {
        let sender = scope.spawn(|| -> anyhow::Result<()> {
            let (mut stream, _) = listener.accept().context("accepting")?;
            stream.set_write_timeout(Some(READ_TIMEOUT))?;
            let data: Vec<u8> = (0..TRANSFER).map(pattern).collect();
            stream.write_all(&data).context("server writing")?;
            // Dropping the socket closes it: FIN after the last byte.
            Ok(())
        });
        let started = Instant::now();
        let mut client = in_netns(&a.ns, || {
            TcpStream::connect_timeout(&server, Duration::from_secs(5))
        })?
        .context("connecting")?;
        client.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            ensure!(
                started.elapsed() < TRANSFER_BOUND,
                "no EOF within {TRANSFER_BOUND:?} (read {total} bytes)"
            );
            let n = client
                .read(&mut buf)
                .with_context(|| format!("client reading after {total} bytes (no EOF)"))?;
            if n == 0 {
                break;
            }
            if let Some(k) = (0..n).find(|&k| buf[k] != pattern(total + k)) {
                bail!("stream corrupted at byte {}", total + k);
            }
            total += n;
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        // The client closes its side too, as a client does at EOF.
        drop(client);
        Ok(total)
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Server,
    Client,
}

/// A connection from `a` to `b`:`port` that carries some data both ways, then `resetter`
/// aborts it (SO_LINGER 0 and close: a RST). The other side's next read must fail with
/// ECONNRESET, and both nodes' conntrack entries must be gone or expire within
/// [`CLOSE`] seconds.
fn reset_case(lab: &Lab, a: &Pod, b: &Pod, port: u16, resetter: Side) -> anyhow::Result<()> {
    let addr = SocketAddr::from((b.ip, port));
    let listener = in_netns(&b.ns, || TcpListener::bind(addr))?.context("listening")?;
    let mut client = in_netns(&a.ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })?
    .context("connecting")?;
    let (mut server, _) = listener.accept().context("accepting")?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(READ_TIMEOUT))?;
    }
    // Data both ways first, so the entry is assured and the fast path carries segments
    // before the reset.
    let chunk = vec![7u8; 200_000];
    let mut buf = vec![0u8; chunk.len()];
    client.write_all(&chunk)?;
    server.read_exact(&mut buf).context("server reading")?;
    server.write_all(&chunk)?;
    client.read_exact(&mut buf).context("client reading")?;

    let (aborted, mut other) = match resetter {
        Side::Server => (server, client),
        Side::Client => (client, server),
    };
    abort(aborted)?;
    match other.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => bail!(
            "{resetter:?} reset port {port}: the other side's read failed with {e}, not ECONNRESET"
        ),
        Ok(n) => bail!(
            "{resetter:?} reset port {port}: the other side read {n} bytes instead of ECONNRESET"
        ),
    }
    drop(other);
    // The RST crossed both nodes before it reached the other side: their entries are
    // gone or closing.
    for node in &lab.nodes {
        for e in conntrack_entries(&node.ns, "tcp", port)? {
            ensure!(
                e.timeout <= CLOSE,
                "{}: after a {resetter:?} reset, port {port}'s entry still has {} s to live (close timeout {CLOSE} s): {}",
                node.ns,
                e.timeout,
                e.line
            );
        }
    }
    Ok(())
}

/// SO_LINGER {on, 0 s}, then close: the kernel aborts the connection with a RST.
fn abort(stream: TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (owned by `stream`); the option value is a valid
    // `struct linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt(SO_LINGER): {}",
        std::io::Error::last_os_error()
    );
    drop(stream);
    Ok(())
}

/// Byte `i` of the transfer: period 251 (prime), so a lost or repeated segment shows.
fn pattern(i: usize) -> u8 {
    // Below 251, so the cast is lossless.
    ((i * 7 + 13) % 251) as u8
}
