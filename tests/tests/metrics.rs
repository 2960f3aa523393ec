//! `metrics_addr`: a scrape during traffic agrees with `hgw-agent status --json` (each
//! counter lies between the status read just before and the one just after), peers and
//! routes are counted by state, reconciles are timed; `/healthz` answers while the
//! loop turns; `/readyz` is 503 while the agent waits (here for etcd) and turns 200
//! exactly when the first peer set is applied; at SIGTERM the agent waits for the
//! server's requests under way, for 2 s at most.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use hgw_agent::serve::metrics::samples;
use hgw_tests::{Etcd, Lab, Status, in_netns, paced_tcp_stream};

/// Inside each node's network namespace: the nodes never share it.
const METRICS: &str = "127.0.0.1:9090";

/// `GET path` from inside `ns`: (status code, body).
fn get(ns: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let addr: SocketAddr = METRICS.parse()?;
    let path = path.to_owned();
    in_netns(ns, move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer.split_once("\r\n\r\n").context("no head")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .context("no status code")?
            .parse()?;
        Ok((code, body.to_owned()))
    })?
}

/// The one sample of `name` with these labels (`{a="b",...}`, "" for none).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(l, _)| l == labels)
        .map(|(_, v)| v)
}

/// Every counter of a status: (family, name, value).
fn status_counters(status: &Status) -> Vec<(String, String, u64)> {
    let mut all = Vec::new();
    for (family, counters) in &status.counters {
        for (name, value) in counters {
            all.push((family.clone(), name.clone(), *value));
        }
    }
    all
}

#[test]
fn a_scrape_during_traffic_agrees_with_status() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in 0..2 {
        lab.start_agent(node, &["--metrics-addr", METRICS])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(Duration::from_secs(15))?;
    }
    let ns = lab.nodes[0].ns.clone();
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let agent = &lab.agents()[0];
    let fwd = "{family=\"ipv4\",counter=\"fwd_to_peer\"}";

    // 500 chunks at 10 ms: about 5 s of traffic to scrape through.
    let scraped = paced_tcp_stream(&from.ns, &to.ns, to.ip, 7090, 500, || {
        let mut forwarded = Vec::new();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(400));
            let before = agent.status()?;
            let (code, text) = get(&ns, "/metrics")?;
            let after = agent.status()?;
            ensure!(code == 200, "/metrics answered {code}: {text}");
            let counters = status_counters(&before);
            ensure!(
                counters.len() > 10,
                "status has no counters: {:?}",
                before.counters
            );
            for (family, name, low) in counters {
                let labels = format!("{{family=\"{family}\",counter=\"{name}\"}}");
                let value = sample(&text, "hgw_packets_total", &labels)
                    .with_context(|| format!("no hgw_packets_total{labels} in\n{text}"))?;
                let high = after.counter(&family, &name);
                ensure!(
                    low as f64 <= value && value <= high as f64,
                    "hgw_packets_total{labels} = {value}, status said {low} before and {high} after"
                );
            }
            forwarded.push(sample(&text, "hgw_packets_total", fwd).unwrap_or(0.0));
        }
        Ok(forwarded)
    })?;
    assert!(
        scraped.windows(2).all(|w| w[0] < w[1]),
        "fwd_to_peer did not grow from scrape to scrape during the stream: {scraped:?}"
    );

    let (_, text) = get(&ns, "/metrics")?;
    // One peer, both families: both routes installed, both next hops resolved.
    for family in ["ipv4", "ipv6"] {
        let labels = format!("{{family=\"{family}\",route=\"installed\",next_hop=\"resolved\"}}");
        assert_eq!(
            sample(&text, "hgw_peer_routes", &labels),
            Some(1.0),
            "{labels}\n{text}"
        );
    }
    assert_eq!(sample(&text, "hgw_routes_installed", ""), Some(2.0));
    assert_eq!(sample(&text, "hgw_ready", ""), Some(1.0));
    for trigger in ["peers", "resync"] {
        let count = sample(
            &text,
            "hgw_reconcile_duration_seconds_count",
            &format!("{{trigger=\"{trigger}\"}}"),
        );
        assert!(
            count.is_some_and(|c| c >= 1.0),
            "no {trigger} reconcile timed:\n{text}"
        );
    }
    assert!(sample(&text, "hgw_netlink_errors_total", "").is_some());
    assert!(sample(&text, "hgw_etcd_errors_total", "").is_some());

    assert_eq!(get(&ns, "/healthz")?.0, 200);
    assert_eq!(get(&ns, "/readyz")?.0, 200);
    assert_eq!(get(&ns, "/nothing-here")?.0, 404);
    Ok(())
}

#[test]
fn readyz_turns_200_when_the_first_peer_set_is_applied() -> anyhow::Result<()> {
    // n1's agent holds its subnet; n2's starts while etcd is down.
    let (mut lab, mut etcd) = Etcd::lab_with_agents(2, 1, 1)?;
    let ns = lab.nodes[1].ns.clone();
    let config = etcd.agent_config(&lab, 1, "");
    etcd.pause()?;
    lab.start_agent_with_config(1, &config, &["--metrics-addr", METRICS])?;

    // Waiting for etcd: alive, not ready, and saying why.
    let start = Instant::now();
    let mut waits = 0;
    while start.elapsed() < Duration::from_secs(4) {
        if let Ok((code, body)) = get(&ns, "/readyz") {
            assert_eq!(code, 503, "ready while etcd is down: {body}");
            assert!(body.contains("waiting for etcd"), "{body}");
            assert_eq!(get(&ns, "/healthz")?.0, 200, "not healthy while waiting");
            waits += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(waits > 5, "/readyz hardly answered while waiting ({waits})");
    let agent = lab.agent(1).context("n2's agent")?;
    assert!(!agent.status()?.ready);

    // From etcd's return on: 503 only while status is not ready yet (read just
    // before), 200 only once it is (read just after). The agent's thread is busy for a
    // while loading the programs: a read that times out then is read again.
    etcd.resume()?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut unready_answers = 0;
    loop {
        let before = agent.status();
        let answer = get(&ns, "/readyz");
        match answer {
            Ok((200, _)) => {
                let after = agent.wait_for(Duration::from_secs(10), |_| true)?;
                assert!(after.ready, "200 before status was ready: {after}");
                break;
            }
            Ok((503, _)) => {
                if let Ok(before) = before {
                    assert!(!before.ready, "503 although status was ready: {before}");
                }
                unready_answers += 1;
            }
            Ok((other, body)) => panic!("/readyz answered {other}: {body}"),
            Err(e) => eprintln!("/readyz: {e:#}"),
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never turned 200\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = agent.status()?;
    assert!(
        status.peers.iter().any(|p| p.route),
        "ready without a peer route: {status}"
    );
    eprintln!("{unready_answers} answers of 503 after etcd came back");
    assert_eq!(get(&ns, "/healthz")?.0, 200);

    // SIGTERM with a request under way that never ends: the agent waits for its
    // server (answering what it can) no longer than its stop allows, says so, exits 0.
    let addr: SocketAddr = METRICS.parse()?;
    let unfinished = in_netns(&ns, move || -> anyhow::Result<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        write!(stream, "GET /metrics HTTP/1.1\r\n")?;
        Ok(stream)
    })??;
    // Accepted in order: once a later request is answered, the unfinished one is taken
    // and its head being read.
    assert_eq!(get(&ns, "/healthz")?.0, 200);
    std::thread::sleep(Duration::from_millis(100));
    let agent = lab.agent_mut(1).context("n2's agent")?;
    let exit = agent.stop()?;
    assert!(
        exit.success(),
        "the agent stopped with {exit}\n{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("metrics: requests still under way after 2s were cut off"),
        "the unfinished request was not named:\n{}",
        agent.log()
    );
    drop(unfinished);
    Ok(())
}
