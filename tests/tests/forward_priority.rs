//! A forwarded packet's priority (`skb->priority`), which egress qdiscs (pfifo_fast's
//! bands, prio, mqprio's traffic classes) and a VLAN's egress QoS map go by: `ip_forward`
//! sets it from the packet's TOS (`net.ipv4.ip_forward_update_priority`, on by
//! default), and the fast path must leave the uplink with the same.
//!
//! A pod on n1 sends UDP with TOS 0x10 (low delay: priority 6) to a pod on n2 that
//! answers each datagram; the packet reaches n1 with priority 0 (a veth resets it).
//! A probe on n1's uplink egress (a cls_bpf filter, which the fast path's redirect
//! passes too; nftables' netdev egress hook it skips) counts the test's datagrams
//! that leave with priority 6: with kernel routes alone (`off`) all of them; with the
//! fast path (`established`, `all`) the same, and n1's `fwd_to_peer` grows by at least
//! the datagrams sent. Before: the fast path's left with 0, and the probe counted none.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{Hook, Lab, PacketMatch, Probe, Verdict, counter, probe_pin_dir, run_in_ok};

const READY: Duration = Duration::from_secs(60);
const DATAGRAMS: usize = 100;
const PORT: u16 = 7400;

const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"#;

/// Opens the flow with one answered datagram, then sends `n` more, each waiting for its
/// answer; prints how many were answered.
const CLIENT: &str = r#"
import socket, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
s.settimeout(2)
s.sendto(b"open", (dst, port))
s.recvfrom(2048)
time.sleep(0.2)
answered = 0
for i in range(n):
    s.sendto(b"datagram %d" % i, (dst, port))
    try:
        s.recvfrom(2048)
        answered += 1
    except socket.timeout:
        pass
print(answered)
"#;

/// The echo server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn forwarded_packets_leave_with_the_priority_of_their_tos() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let n1 = lab.nodes[0].ns.clone();
    let six = Probe::load(
        PacketMatch::udp_to(b.ip, PORT).with_priority(6),
        Verdict::Next,
    )?;
    let _filter = six.attach_legacy(&n1, "eth0", Hook::Egress, 1, &probe_pin_dir(&lab)?)?;
    let _server = Server(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &b.ns,
                "python3",
                "-c",
                SERVER,
                &PORT.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting the echo server")?,
    );
    let mut failures = Vec::new();
    for mode in ["off", "established", "all"] {
        lab.start_agent(0, &["--fast-path", mode])?;
        lab.start_agent(1, &["--fast-path", mode])?;
        for agent in lab.agents() {
            agent.wait_ready(READY)?;
        }
        let (before, six_before) = (lab.agent(0).context("n1's agent")?.status()?, six.count()?);
        let out = run_in_ok(
            &a.ns,
            "python3",
            &[
                "-c",
                CLIENT,
                &b.ip.to_string(),
                &PORT.to_string(),
                &DATAGRAMS.to_string(),
            ],
        )?;
        let answered: usize = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        let after = lab.agent(0).context("n1's agent")?.status()?;
        let carried = counter(&after, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer");
        // The opening datagram too.
        let with_six = six.count()? - six_before;
        eprintln!(
            "{mode}: {answered}/{DATAGRAMS} answered, n1 fwd_to_peer +{carried}, left n1 with priority 6: {with_six}"
        );
        let all = DATAGRAMS as u64;
        let ok = answered == DATAGRAMS && with_six > all && (mode == "off" || carried >= all);
        if !ok {
            failures.push(format!(
                "{mode}: {answered}/{DATAGRAMS} answered, n1 fwd_to_peer +{carried}, left n1 with priority 6: {with_six}"
            ));
        }
        for node in 0..2 {
            if let Some(agent) = lab.agent_mut(node) {
                agent.stop()?;
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
