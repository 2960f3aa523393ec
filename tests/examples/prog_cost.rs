//! `prog_cost FLOOR_OBJECT TRIALS`: the in-kernel cost of the agent's programs
//! ([`hgw_tests::cost`]), printed as JSON on stdout for `cargo xtask bench`. An example
//! of the tests crate because the agent's embedded object comes from hgw-agent, which
//! only the tests crate's dev targets depend on (xtask must build before the eBPF
//! toolchain is set up). Needs root.

use anyhow::Context as _;
use hgw_tests::floor::Object;

fn main() -> anyhow::Result<()> {
    // Ctrl-C reaches the whole process group: xtask notes it and removes its labs once
    // this returns, but dying here would leave the conntrack case's namespace behind.
    // The run takes seconds, so it finishes and cleans up instead.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: plain syscall; SIG_IGN runs no code in the handler's context.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let mut args = std::env::args_os().skip(1);
    let (Some(floor), Some(trials), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: prog_cost FLOOR_OBJECT TRIALS");
    };
    let trials: usize = trials
        .to_str()
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("TRIALS {trials:?}: expected a number"))?;
    let floor = Object::read(floor.as_ref())?;
    let costs =
        hgw_tests::cost::program_costs(hgw_agent::datapath::PROGRAMS, floor.bytes(), trials)?;
    println!("{}", serde_json::to_string(&costs)?);
    Ok(())
}
