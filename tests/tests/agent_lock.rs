//! One agent per network namespace, and only an agent can say so: a process of another
//! user that binds the abstract socket @hgw-agent first (any user on the node, or a
//! hostNetwork pod, can) does not stop the agent from starting, and a second real agent
//! in the same network namespace is still refused, naming the first.

use std::{
    io::BufRead as _,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use hgw_tests::Lab;

const NOBODY: &str = "65534";

/// A process of user nobody holding @hgw-agent in a lab namespace; killed when dropped.
struct Squatter(Child);

impl Squatter {
    fn start(ns: &str) -> anyhow::Result<Squatter> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "setpriv"])
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .args(["--clear-groups", "/usr/bin/python3", "-c"])
            .arg(
                "import socket, sys, time\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.bind('\\0hgw-agent')\n\
                 s.listen()\n\
                 print('bound', flush=True)\n\
                 time.sleep(1e9)\n",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the squatter")?;
        let stdout = child.stdout.take().context("the squatter's stdout")?;
        let squatter = Squatter(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        ensure!(
            line.trim() == "bound",
            "the squatter did not bind @hgw-agent"
        );
        Ok(squatter)
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn another_users_socket_does_not_stop_the_agent_and_a_second_agent_is_refused() -> anyhow::Result<()>
{
    let mut lab = Lab::up(2, 1)?;
    let _squatter = Squatter::start(&lab.nodes[0].ns)?;

    let agent = lab.start_agent(0, &[])?;
    agent.wait_ready(Duration::from_secs(15))?;
    let pid = format!("pid {}", agent.pid());

    // A second agent in the namespace, as root like the first, while the squatter holds
    // the abstract socket: still refused, naming the first.
    let config = lab.agent_config(0);
    let (exit, stderr, _) = lab.run_agent_to_exit(0, &config)?;
    assert!(!exit.success(), "a second agent started:\n{stderr}");
    assert!(
        stderr.contains("another hgw agent") && stderr.contains(&pid),
        "the error does not name the running agent ({pid}):\n{stderr}"
    );
    let agent = lab.agent(0).context("n1's agent")?;
    assert!(
        agent.is_running(),
        "the first agent exited:\n{}",
        agent.log()
    );
    assert!(agent.status()?.ready, "the first agent is no longer ready");
    Ok(())
}
