//! A client reopens a TCP connection on the same 4-tuple right after the fast path
//! carried the previous one's data and close (the server closed first, so its TIME_WAIT
//! takes the new SYN). Conntrack never saw that close: without hgw's reopen handling
//! its entry would still say ESTABLISHED and the new connection's SYN would pass FORWARD
//! as established. With kernel routes alone conntrack sees the close, and the new SYN is
//! NEW. Both modes must give the same answer: two NEW SYNs counted in the server
//! node's FORWARD chain, and both connections complete.

use std::io::Read as _;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, counter_sum, in_netns, restart_agents, run_in_ok};

const PORT: u16 = 7075;
const CLIENT_PORT: u16 = 40075;
const BYTES: usize = 200_000;
const RULE_COMMENT: &str = "hgw-test: new SYNs to the server";

#[test]
fn a_reopened_4_tuple_is_a_new_connection_as_with_kernel_routes() -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (client, server) = (n1.pods[0].clone(), n2.pods[0].clone());
    let server_ip = server.ip.to_string();
    run_in_ok(
        &n2.ns,
        "iptables",
        &[
            "-w",
            "-I",
            "FORWARD",
            "1",
            "-p",
            "tcp",
            "--syn",
            "-d",
            &server_ip,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            RULE_COMMENT,
        ],
    )?;
    // Each mode its own client port: the other mode's last connection leaves an entry.
    for (mode, client_port) in [("established", CLIENT_PORT), ("off", CLIENT_PORT + 1)] {
        restart_agents(&mut lab, mode)?;
        let before_new = new_syns(&n2.ns)?;
        let before = lab.statuses()?;
        two_connections_on_one_4_tuple(&client.ns, &server.ns, &server_ip, client_port)
            .with_context(|| format!("{mode} mode"))?;
        let new = new_syns(&n2.ns)? - before_new;
        let after = lab.statuses()?;
        let reopened =
            counter_sum(&after, "ipv4.ct_reopen") - counter_sum(&before, "ipv4.ct_reopen");
        let carried =
            counter_sum(&after, "ipv4.fwd_to_peer") - counter_sum(&before, "ipv4.fwd_to_peer");
        eprintln!(
            "{mode}: NEW SYNs in FORWARD +{new}, ct_reopen +{reopened}, fwd_to_peer +{carried}"
        );
        assert_eq!(
            new, 2,
            "{mode}: FORWARD saw {new} new connections, expected 2"
        );
        if mode == "established" {
            // The first connection's data and close rode the fast path, and the reopen
            // was recognised on both nodes (n1's bridge side, n2's uplink side).
            assert!(
                carried >= 10,
                "{mode}: the fast path carried {carried} packets"
            );
            assert!(
                reopened >= 2,
                "{mode}: ct_reopen grew by {reopened}, expected 2"
            );
        }
    }
    Ok(())
}

/// Two connections from `client_port` to the server, one after the other; the server
/// reads `BYTES` and closes first each time.
fn two_connections_on_one_4_tuple(
    client_ns: &str,
    server_ns: &str,
    server_ip: &str,
    client_port: u16,
) -> anyhow::Result<()> {
    let listener = in_netns(server_ns, || TcpListener::bind((server_ip, PORT)))??;
    listener.set_nonblocking(true)?;
    std::thread::scope(|scope| {
        let server = scope.spawn(|| -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(20);
            for _ in 0..2 {
                let (mut stream, _) = loop {
                    match listener.accept() {
                        Ok(accepted) => break accepted,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            ensure!(Instant::now() < deadline, "no connection came");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut data = vec![0; BYTES];
                stream.read_exact(&mut data)?;
                // Dropped here: the server closes first and keeps the TIME_WAIT.
            }
            Ok(())
        });
        // std cannot bind a client socket before connecting; Python's socket module can.
        let script = format!(
            "import socket, time\n\
             for i in range(2):\n\
             \x20   s = socket.socket()\n\
             \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             \x20   s.settimeout(5)\n\
             \x20   s.bind(('', {client_port}))\n\
             \x20   s.connect(('{server_ip}', {PORT}))\n\
             \x20   s.sendall(b'x' * {BYTES})\n\
             \x20   while s.recv(65536): pass\n\
             \x20   s.close()\n\
             \x20   time.sleep(0.3)\n"
        );
        let client = run_in_ok(client_ns, "python3", &["-c", &script]);
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
        client.context("the client")?;
        served.context("the server")
    })
}

/// The packet count of the NEW-SYN rule in `ns`'s FORWARD chain.
fn new_syns(ns: &str) -> anyhow::Result<u64> {
    let out = run_in_ok(ns, "iptables", &["-w", "-L", "FORWARD", "-v", "-n", "-x"])?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(RULE_COMMENT))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("the NEW-SYN rule's counter")
}
