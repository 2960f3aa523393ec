//! A neighbour entry on cni0 for a pod that has no port (a deleted pod's entry stays
//! below gc_thresh1, and a pod can add such entries) is looked for in the forwarding
//! tables a few times, with backoff, and then no more: with 30,000 forwarding entries
//! on the bridge, the agent is idle once the search is over, instead of dumping every
//! bridge's table once a second forever.

use std::{io::Write as _, time::Duration};

use anyhow::Context as _;
use hgw_tests::{Lab, run_in_ok};

const FDB_ENTRIES: u32 = 30_000;
/// The search for a port is over by then (dumps after 0, 1, 3, 7 and 15 s).
const SEARCH: Duration = Duration::from_secs(20);
/// One resync (every 30 s) dumps the tables in this window; a dump a second would be 30.
const IDLE: Duration = Duration::from_secs(30);

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        Ok(fields.get(n).context("short /proc/PID/stat")?.parse()?)
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    Ok(field(11)? + field(12)?)
}

#[test]
fn a_pod_without_a_port_is_looked_for_a_few_times_then_left() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let node = &lab.nodes[0];
    let agent = lab.agent(0).context("agent on n1")?;

    let ports = run_in_ok(&node.ns, "ip", &["-o", "link", "show", "master", "cni0"])?;
    let ports = String::from_utf8_lossy(&ports.stdout).into_owned();
    let port = ports
        .lines()
        .find_map(|l| l.split(": ").nth(1))
        .and_then(|name| name.split('@').next())
        .with_context(|| format!("no port on cni0: {ports}"))?
        .to_owned();
    let batch = lab.dir().join("fdb-stale.batch");
    let mut file = std::fs::File::create(&batch)?;
    for i in 0..FDB_ENTRIES {
        let [_, a, b, c] = i.to_be_bytes();
        writeln!(
            file,
            "fdb add 02:f2:00:{a:02x}:{b:02x}:{c:02x} dev {port} master static"
        )?;
    }
    drop(file);
    run_in_ok(&node.ns, "bridge", &["-batch", &batch.to_string_lossy()])?;
    // A pod address with a MAC no port has: what a deleted pod leaves.
    run_in_ok(
        &node.ns,
        "ip",
        &[
            "neigh",
            "add",
            "10.244.1.200",
            "lladdr",
            "02:f3:00:00:00:01",
            "dev",
            "cni0",
            "nud",
            "permanent",
        ],
    )?;

    std::thread::sleep(SEARCH);
    let before = cpu_ticks(agent.pid())?;
    std::thread::sleep(IDLE);
    let used = cpu_ticks(agent.pid())? - before;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let ms = used * 1000 / per_second;
    eprintln!("agent CPU over {IDLE:?}: {ms} ms");
    assert!(
        ms < 200,
        "the agent used {ms} ms of CPU in {IDLE:?} with nothing to do:\n{}",
        agent.log()
    );
    assert!(agent.status()?.ready);
    Ok(())
}
