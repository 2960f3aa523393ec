//! A pin directory belongs to one network namespace: the agent of another namespace
//! given the same directory is refused, naming it, and leaves the first agent's pins
//! and programs alone (interface names and indexes repeat across namespaces, so it
//! would otherwise adopt the other node's links and maps). With a directory of its own
//! it runs.

use std::time::Duration;

use hgw_tests::{Lab, hgw_programs};

#[test]
fn an_agent_of_another_namespace_is_refused_the_pin_directory() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    lab.start_agent(0, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let shared = lab.pin_dir(0).to_string_lossy().into_owned();
    let before = hgw_programs(&lab.nodes[0].ns)?;

    let agent = lab.start_agent(1, &["--pin-dir", &shared])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while agent.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !agent.is_running(),
        "the agent of n2 runs on n1's pin directory"
    );
    let log = agent.log();
    assert!(
        log.contains("pin_dir")
            && log.contains(&shared)
            && log.contains("another network namespace"),
        "the error does not name the directory and the reason: {log}"
    );
    assert!(
        hgw_programs(&lab.nodes[1].ns)?.is_empty(),
        "n2 kept programs from the refused start"
    );
    assert_eq!(
        hgw_programs(&lab.nodes[0].ns)?,
        before,
        "n1's programs changed"
    );
    assert!(
        lab.agents()[0].status()?.ready,
        "n1's agent is no longer ready"
    );

    // Its own directory: it runs.
    lab.start_agent(1, &[])?
        .wait_ready(Duration::from_secs(15))?;
    assert!(!hgw_programs(&lab.nodes[1].ns)?.is_empty());
    Ok(())
}
