//! A pod reaches a service of another node's host bound to that node's gateway address
//! (10.244.1.1 and fd00:244:1::1, cni0's addresses, inside n1's pod CIDR): a TCP server
//! in n1's node namespace, a client in the pod on n2.
//!
//! The gateway address lies in n1's pod CIDR but belongs to n1 itself, so n1's uplink
//! program must hand packets for it to the kernel (`pass_local`) in every mode, not
//! redirect them into the bridge, where nobody answers: that was the timeout of issue
//! 9's table (before commit ca65a94 the programs did so, and programs.rs asserted it).
//! `established` (the default), `all` and `off` give the same answer, both families.
//! Checked by hand with the agent of c0e6b27: the first request timed out.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hgw_tests::{Lab, counter, is_ok_reply, restart_agents, tcp_request};

const PORT: u16 = 8443;
const TIMEOUT: Duration = Duration::from_secs(5);
const REQUESTS: u64 = 3;

#[test]
fn pod_reaches_a_host_service_on_another_nodes_gateway_address() -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(2, 1)?;
    let n1 = lab.nodes[0].clone();
    let client = lab.nodes[1].pods[0].clone();
    let request = |mode: &str, gateway: IpAddr, source: IpAddr, count: u64| {
        let listen = SocketAddr::from((gateway, PORT));
        for i in 0..count {
            let answer = tcp_request(&client.ns, &n1.ns, listen, listen, TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{mode}: request {i} to {listen}: {e:#}"))?;
            assert!(
                is_ok_reply(&answer.reply),
                "{mode}: reply {:?}",
                answer.reply
            );
            assert_eq!(answer.server_saw.ip(), source, "{mode}: peer at n1");
        }
        anyhow::Ok(())
    };
    let families = [
        ("ipv4", IpAddr::from(n1.gateway), IpAddr::from(client.ip)),
        ("ipv6", IpAddr::from(n1.gateway6), IpAddr::from(client.ip6)),
    ];

    let before = lab.agents()[0].status()?;
    for (_, gateway, source) in families {
        request("established", gateway, source, REQUESTS)?;
    }
    let after = lab.agents()[0].status()?;
    for (family, ..) in families {
        let name = format!("{family}.pass_local");
        let grew = counter(&after, &name) - counter(&before, &name);
        eprintln!("established: n1 {name} +{grew}");
        // At least the SYN and the request of each exchange are for n1 itself.
        assert!(
            grew >= 2 * REQUESTS,
            "n1 {name} grew by {grew}, expected at least {}",
            2 * REQUESTS
        );
    }

    for mode in ["all", "off"] {
        restart_agents(&mut lab, mode)?;
        for (_, gateway, source) in families {
            request(mode, gateway, source, 1)?;
        }
    }
    Ok(())
}
