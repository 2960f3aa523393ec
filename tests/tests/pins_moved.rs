//! Pins the agent cannot keep or must not ignore: an earlier agent's programs pinned in
//! another `pin_dir` of the same network namespace would sit first on the hooks and take
//! the traffic, so the new agent removes them, saying so (without naming programs by
//! id, which needs CAP_SYS_ADMIN); a bpffs the agent has to mount in its own mount
//! namespace (`ip netns exec` makes one) dies with it, and the agent says so.

use std::time::Duration;

use hgw_tests::{Lab, hgw_programs};

#[test]
fn an_earlier_agents_pins_in_another_pin_dir_are_removed() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let agent = lab.start_agent(0, &[])?;
    agent.wait_ready(Duration::from_secs(15))?;
    // SIGKILL: the pinned programs stay on the hooks.
    agent.kill()?;
    let earlier = hgw_programs(&lab.nodes[0].ns)?;
    assert!(!earlier.is_empty(), "nothing pinned stayed");
    let old_dir = lab.pin_dir(0);
    let moved = lab.dir().join("bpf").join("moved");
    let moved = moved.to_string_lossy().into_owned();
    let agent = lab.start_agent(0, &["--pin-dir", &moved])?;
    agent.wait_ready(Duration::from_secs(15))?;
    let log = agent.log();
    assert!(
        log.contains("pins an earlier agent of this network namespace left in")
            && log.contains(&old_dir.to_string_lossy().into_owned()),
        "no word of the earlier pins, naming their directory: {log}"
    );
    assert!(
        !old_dir.join("links").exists(),
        "the earlier link pins are still there"
    );
    // One hgw program per hook, none of the earlier ones: the new agent's alone.
    let now = hgw_programs(&lab.nodes[0].ns)?;
    let hooks = |programs: &[String]| -> Vec<String> {
        let mut hooks: Vec<String> = programs
            .iter()
            .map(|p| p.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        hooks.sort();
        hooks
    };
    let mut unique = hooks(&now);
    unique.dedup();
    assert_eq!(hooks(&now), unique, "two hgw programs on a hook: {now:?}");
    assert!(
        now.iter().all(|p| !earlier.contains(p)),
        "an earlier program is still attached: {now:?} (earlier {earlier:?})"
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
