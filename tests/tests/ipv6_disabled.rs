//! `net.ipv6.conf.DEV.disable_ipv6` on the interface pod traffic enters a node by makes
//! the kernel drop every IPv6 packet coming in there (`ipv6_rcv`): with kernel routes
//! alone, an IPv6 flow between pods stops. hgw's FIB check did not see it (the routes
//! through the other interface stay), and carried the flow on.
//!
//! A UDP flow over IPv6 from n1's pod to n2's pod, answered, then (each case on a lab
//! of its own: disabling IPv6 takes the interface's addresses and routes along) IPv6
//! disabled on n1's cni0 (the pods' way in) or on n2's eth0 (the peers' way in), and a
//! batch sent. `off`: none arrives. `established`: none either; `status` names the
//! interface, and the node's program hands the batch on (`ipv6.pass_family_off`), where
//! before its fast path carried all of it.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, UdpFlow, counter, run_in_ok};

const BATCH: usize = 50;

/// Node index, interface, and the program's counter that carries the flow there.
const CASES: &[(usize, &str, &str)] = &[
    (0, "cni0", "ipv6.fwd_to_peer"),
    (1, "eth0", "ipv6.fwd_to_pod"),
];

#[test]
fn ipv6_disabled_on_the_way_in_stops_an_ipv6_flow_as_without_hgw() -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for &(node, interface, carried) in CASES {
        for mode in ["off", "established"] {
            let what = format!("{mode}, IPv6 disabled on n{}'s {interface}", node + 1);
            let mut lab = Lab::up(2, 1)?;
            lab.start_agents(&["--fast-path", mode], Duration::from_secs(15))?;
            let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
            let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip6)?;
            let got = flow.send(BATCH)?;
            ensure!(got == BATCH, "{what}: {got}/{BATCH} arrived before");
            run_in_ok(
                &lab.nodes[node].ns,
                "sysctl",
                &["-w", &format!("net.ipv6.conf.{interface}.disable_ipv6=1")],
            )?;
            let hgw = mode != "off";
            if hgw {
                let agent = lab.agent(node).context("the node's agent")?;
                agent.wait_for(Duration::from_secs(3), |s| {
                    s.ipv6_disabled.iter().any(|i| i == interface)
                })?;
            }
            let before = lab.statuses()?;
            let got = flow.send(BATCH)?;
            let after = lab.statuses()?;
            let grew = |name: &str| counter(&after[node], name) - counter(&before[node], name);
            let (fwd, passed) = (grew(carried), grew("ipv6.pass_family_off"));
            eprintln!("{what}: {got}/{BATCH} arrived; {carried} +{fwd}, pass_family_off +{passed}");
            if got != 0 || hgw && (fwd != 0 || passed < BATCH as u64) {
                failures.push(format!(
                    "{what}: {got}/{BATCH} arrived, {carried} +{fwd}, ipv6.pass_family_off +{passed}"
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
