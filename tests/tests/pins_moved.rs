//! Pins the agent cannot keep or must not ignore: an earlier agent's programs pinned in
//! another `pin_dir` stop a new agent (as root it can name them), saying how to remove
//! them; a bpffs the agent has to mount in its own mount namespace (`ip netns exec`
//! makes one) dies with it, and the agent says so.

use std::time::{Duration, Instant};

use hgw_tests::{Lab, hgw_programs};

/// Waits up to 15 s for `agent` to exit; its log.
fn exited_log(agent: &hgw_tests::Agent) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::ensure!(!agent.is_running(), "the agent still runs: {}", agent.log());
    Ok(agent.log())
}

#[test]
fn programs_pinned_in_another_pin_dir_stop_a_new_agent() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let agent = lab.start_agent(0, &[])?;
    agent.wait_ready(Duration::from_secs(15))?;
    // SIGKILL: the pinned programs stay on the hooks.
    agent.kill()?;
    let pinned = hgw_programs(&lab.nodes[0].ns)?;
    assert!(!pinned.is_empty(), "nothing pinned stayed");
    let moved = lab.dir().join("bpf").join("moved");
    let moved = moved.to_string_lossy().into_owned();
    let log = exited_log(lab.start_agent(0, &["--pin-dir", &moved])?)?;
    assert!(
        log.contains("already runs hgw program") && log.contains("uninstall --pin-dir"),
        "the refusal does not say how to remove the earlier pins: {log}"
    );
    assert_eq!(
        hgw_programs(&lab.nodes[0].ns)?,
        pinned,
        "the earlier pinned programs changed"
    );
    Ok(())
}

#[test]
fn a_bpffs_that_dies_with_the_agent_is_named() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    // Not on a bpffs: the agent mounts one there, inside the mount namespace `ip netns
    // exec` gave it.
    let plain = lab.dir().join("plain-pins");
    std::fs::create_dir_all(&plain)?;
    let plain = plain.to_string_lossy().into_owned();
    let agent = lab.start_agent(0, &["--pin-dir", &plain])?;
    agent.wait_ready(Duration::from_secs(15))?;
    let log = agent.log();
    assert!(
        log.contains("lives only as long as this process"),
        "no word that the pins will not outlive the agent: {log}"
    );
    Ok(())
}
