//! The agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and nothing else: it runs
//! as user nobody with exactly those three (ambient and bounding set), so it owes
//! nothing to root's files or to any other capability, and carries traffic on the fast
//! path. Without them it stops before touching anything, naming what is missing. A
//! second agent in the same network namespace is refused under the same reduced set
//! (where programs on a hook cannot be named: that needs CAP_SYS_ADMIN). The status
//! socket is 0600, and a status_socket path that is not a socket is never removed.

use std::{
    fs::File,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use hgw_tests::{
    Credentials, Lab, Status, agent_bin, counter, credentials, hgw_programs, hgw_routes, status_at,
    udp_replied_exchange, wait_ready_at,
};

const NOBODY: u32 = 65534;
const THREE: &str = "bpf,+net_admin,+perfmon";
/// CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
const THREE_MASK: u64 = (1 << 12) | (1 << 38) | (1 << 39);

/// An agent started by this test (not by the lab), killed when dropped.
struct Reduced {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Reduced {
    /// `ip netns exec NS setpriv <as nobody, with caps> hgw-agent run ...`: the
    /// namespace first (ip netns exec needs root), then the privileges are dropped.
    fn start(lab: &Lab, node: usize, name: &str, caps: &str) -> anyhow::Result<Reduced> {
        let dir = nobody_dir(lab)?;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, lab.agent_config(node))?;
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let caps = format!("-all,+{caps}");
        // Pins on the lab's bpffs, in a directory the agent's user owns (mounting a
        // bpffs would need CAP_SYS_ADMIN).
        let pins = lab.prepare_pin_dir(node)?.join(name);
        std::fs::create_dir_all(&pins)?;
        std::os::unix::fs::chown(&pins, Some(NOBODY), Some(NOBODY))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.nodes[node].ns, "setpriv"])
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--setup-node")
            .arg("--status-socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pins)
            .arg("--subnet-env")
            .arg(dir.join(format!("{name}-subnet.env")))
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the agent under setpriv")?;
        Ok(Reduced { child, socket, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> anyhow::Result<Status> {
        status_at(&self.socket)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Status> {
        let log = self.log.clone();
        wait_ready_at(&self.socket, &mut self.child, timeout, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    }

    /// For an agent that must refuse to start.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.child.try_wait()? {
                return Ok(exit);
            }
            ensure!(
                Instant::now() < deadline,
                "the agent still runs after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Reduced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory in the lab's own where nobody may write its socket.
fn nobody_dir(lab: &Lab) -> anyhow::Result<PathBuf> {
    let dir = lab.dir().join("nobody");
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))?;
    Ok(dir)
}

#[test]
fn the_agent_runs_as_nobody_with_three_capabilities() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    lab.start_agent(1, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let mut agent = Reduced::start(&lab, 0, "reduced", THREE)?;
    agent.wait_ready(Duration::from_secs(15))?;

    // `ip netns exec` and setpriv exec in place: the child's pid is the agent's.
    let Credentials {
        uid,
        effective: caps,
        ..
    } = credentials(agent.child.id())?;
    assert_eq!(uid, NOBODY, "the agent is not running as nobody");
    assert_eq!(caps, THREE_MASK, "effective capabilities {caps:#x}");
    let meta = std::fs::metadata(&agent.socket)?;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "status socket mode"
    );
    assert_eq!(meta.uid(), NOBODY, "status socket owner");

    // Routes, next hops and programs are in place, and the fast path carries a flow
    // both ways (n2's agent runs as root, as before).
    let n1 = lab.nodes[0].ns.clone();
    assert!(!hgw_routes(&n1)?.is_empty(), "no hgw routes on n1");
    assert!(!hgw_programs(&n1)?.is_empty(), "no hgw programs on n1");
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    const PACKETS: usize = 50;
    let cases: [(&str, std::net::IpAddr); 2] = [("ipv4", to.ip.into()), ("ipv6", to.ip6.into())];
    for (family, ip) in cases {
        let name = format!("{family}.fwd_to_peer");
        let before = counter(&agent.status()?, &name);
        let arrived = udp_replied_exchange(&from.ns, &to.ns, ip, PACKETS)?;
        assert_eq!(arrived, PACKETS, "{family}: packets lost");
        let after = counter(&agent.status()?, &name);
        assert!(
            after >= before + PACKETS as u64,
            "{family}: the fast path did not carry the flow: {name} {before} -> {after}\n{}",
            agent.log()
        );
    }
    Ok(())
}

#[test]
fn without_the_capabilities_the_agent_names_what_is_missing() -> anyhow::Result<()> {
    let lab = Lab::up(2, 1)?;
    let n1 = lab.nodes[0].ns.clone();
    let mut agent = Reduced::start(&lab, 0, "net-admin-only", "net_admin")?;
    let exit = agent.wait_exit(Duration::from_secs(20))?;
    let log = agent.log();
    assert!(!exit.success(), "started without CAP_BPF:\n{log}");
    assert!(
        log.contains("missing capabilities: CAP_BPF, CAP_PERFMON"),
        "the error does not name the missing capabilities:\n{log}"
    );
    // Checked before anything changed.
    assert!(hgw_routes(&n1)?.is_empty(), "routes left behind");
    assert!(hgw_programs(&n1)?.is_empty(), "programs left behind");
    assert!(!agent.socket.exists(), "status socket left behind");
    Ok(())
}

#[test]
fn a_second_agent_in_the_namespace_is_refused_under_the_reduced_set() -> anyhow::Result<()> {
    let lab = Lab::up(2, 1)?;
    let n1 = lab.nodes[0].ns.clone();
    let mut first = Reduced::start(&lab, 0, "first", THREE)?;
    first.wait_ready(Duration::from_secs(15))?;
    let programs = hgw_programs(&n1)?;

    let mut second = Reduced::start(&lab, 0, "second", THREE)?;
    let exit = second.wait_exit(Duration::from_secs(20))?;
    let log = second.log();
    assert!(!exit.success(), "a second agent started:\n{log}");
    let pid = format!("pid {}", first.child.id());
    assert!(
        log.contains("another hgw agent") && log.contains(&pid),
        "the error does not name the running agent ({pid}):\n{log}"
    );
    // The first one goes on as it was.
    assert_eq!(
        hgw_programs(&n1)?,
        programs,
        "the programs changed on the hooks"
    );
    assert!(first.status()?.ready);
    assert!(first.child.try_wait()?.is_none(), "the first agent exited");
    Ok(())
}

#[test]
fn a_status_socket_path_that_is_not_a_socket_is_left_alone() -> anyhow::Result<()> {
    let lab = Lab::up(2, 1)?;
    let path: &Path = &lab.dir().join(format!("{}-once.sock", lab.nodes[0].name));
    std::fs::write(path, "precious")?;
    let (exit, stderr, socket) = lab.run_agent_to_exit(0, &lab.agent_config(0))?;
    assert_eq!(socket, path, "the lab's status socket path moved");
    assert!(!exit.success(), "the agent started over a regular file");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("not a socket"),
        "the error does not name the path: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(path)?,
        "precious",
        "the file changed"
    );
    assert!(
        hgw_routes(&lab.nodes[0].ns)?.is_empty(),
        "routes installed anyway"
    );
    Ok(())
}
