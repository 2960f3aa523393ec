//! A peer's uplink MAC changes (`ip link set address`, announced by gratuitous ARP as
//! with arp_notify): its next hop follows within a second, and a TCP stream between
//! pods on the two nodes survives the change.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use hgw_tests::{Lab, counter, in_netns, run_in_ok};

const NEW_MAC: &str = "02:68:67:77:00:02";
const CHUNK: usize = 4096;
const CHUNKS: usize = 600;

#[test]
fn next_hop_follows_a_peer_mac_change_and_tcp_survives() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n2, from, to) = (
        lab.nodes[1].clone(),
        lab.nodes[0].pods[0].clone(),
        lab.nodes[1].pods[0].clone(),
    );
    run_in_ok(
        &n2.ns,
        "sysctl",
        &["-qw", "net.ipv4.conf.eth0.arp_notify=1"],
    )?;

    let addr = SocketAddr::from((to.ip, 7070));
    let listener = in_netns(&to.ns, || TcpListener::bind(addr))??;
    let client = in_netns(&from.ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })??;
    let (server, _) = listener.accept()?;

    let received = std::thread::scope(|scope| -> anyhow::Result<usize> {
        // A paced stream of patterned bytes: about 6 s, so it spans the change.
        let sender = scope.spawn(move || -> std::io::Result<()> {
            let mut client = client;
            client.set_write_timeout(Some(Duration::from_secs(20)))?;
            for i in 0..CHUNKS {
                let chunk: Vec<u8> = (0..CHUNK).map(|j| ((i * CHUNK + j) % 251) as u8).collect();
                client.write_all(&chunk)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        let receiver = scope.spawn(move || -> anyhow::Result<usize> {
            let mut server = server;
            server.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut total = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = server.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    anyhow::ensure!(
                        *b == ((total + k) % 251) as u8,
                        "stream corrupted at byte {}",
                        total + k
                    );
                }
                total += n;
            }
        });

        std::thread::sleep(Duration::from_secs(1));
        run_in_ok(
            &n2.ns,
            "ip",
            &["link", "set", "dev", "eth0", "address", NEW_MAC],
        )?;
        let changed = Instant::now();
        let agent = lab.agent(0).expect("agent");
        let status = agent.wait_for(Duration::from_secs(1), |s| s["peers"][0]["mac"] == NEW_MAC)?;
        eprintln!(
            "n1's next hop for n2 follows the new MAC after {:?}",
            changed.elapsed()
        );
        let fwd = counter(&status, "fwd_to_peer");

        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        let after = counter(&agent.status()?, "fwd_to_peer");
        anyhow::ensure!(
            after > fwd + 100,
            "the fast path did not carry the stream after the change: {fwd} -> {after}"
        );
        Ok(received)
    })?;
    assert_eq!(
        received,
        CHUNK * CHUNKS,
        "the TCP stream lost data across the MAC change"
    );
    Ok(())
}
