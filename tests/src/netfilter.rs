//! What a Kubernetes node carries besides the pod network, for the NAT tests: kube-proxy's
//! rules (iptables and nftables modes), CNI portmap's hostPort DNAT, a host outside the
//! cluster on the lab's switch, and a small request/response exchange (TCP and UDP) that
//! tells who answered and whom the server saw.
//!
//! Rules are written the way their real authors write them (iptables-restore text with
//! kube-proxy's chain names and comments, `nft -f` for kube-proxy's nftables table, the
//! real portmap binary), into lab namespaces only.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::cmd::{COMMAND_TIMEOUT, describe, ip, kill_and_reap, netns_command, wait_timeout};
use crate::lab::Lab;
use crate::netns::{delete_namespace_quietly, in_netns};

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
pub const KUBE_MARK_MASQ: u32 = 0x4000;
/// The CNI plugins Debian installs (containernetworking-plugins).
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The reply body every [`tcp_request`] server sends.
pub const REPLY_BODY: &str = "hello from the hgw lab\n";

/// How long to wait for a new agent to be ready after a restart.
const AGENT_READY: Duration = Duration::from_secs(15);
/// How long a UDP client waits for each reply.
const UDP_REPLY_WAIT: Duration = Duration::from_millis(1000);

/// Restarts every agent of `lab` with `--fast-path MODE` and waits until each is ready.
pub fn restart_agents(lab: &mut Lab, mode: &str) -> anyhow::Result<()> {
    for node in 0..lab.nodes.len() {
        lab.start_agent(node, &["--fast-path", mode])?
            .wait_ready(AGENT_READY)?;
    }
    Ok(())
}

/// Runs `ip netns exec NS CMD ARGS` with `input` on stdin and extra environment
/// variables; fails unless it exits 0 (the error carries stdout and stderr).
pub fn run_with_input(
    ns: &str,
    cmd: &str,
    args: &[&str],
    env: &[(&str, &str)],
    input: &str,
) -> anyhow::Result<Output> {
    let mut command = netns_command(ns, cmd, args);
    command.envs(env.iter().copied());
    let what = describe(&command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    let mut stdin = child.stdin.take().context("stdin pipe")?;
    let input = input.to_owned();
    // Written from a thread so a child that answers before reading cannot deadlock us.
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let Some(status) = wait_timeout(&mut child, COMMAND_TIMEOUT)? else {
        kill_and_reap(&mut child);
        bail!("`{what}` did not finish within {COMMAND_TIMEOUT:?}");
    };
    let _ = writer.join();
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    ensure!(
        out.status.success(),
        "`{what}` failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// `iptables-restore --noflush` in `ns`: kube-proxy's way of writing its rules.
pub fn iptables_restore(ns: &str, rules: &str) -> anyhow::Result<()> {
    restore(ns, "iptables-restore", rules)
}

/// `ip6tables-restore --noflush` in `ns`.
pub fn ip6tables_restore(ns: &str, rules: &str) -> anyhow::Result<()> {
    restore(ns, "ip6tables-restore", rules)
}

fn restore(ns: &str, tool: &str, rules: &str) -> anyhow::Result<()> {
    run_with_input(ns, tool, &["-w", "--noflush"], &[], rules)
        .with_context(|| format!("{tool} in {ns} of:\n{rules}"))?;
    Ok(())
}

/// `nft -f -` in `ns`.
pub fn nft_apply(ns: &str, script: &str) -> anyhow::Result<()> {
    run_with_input(ns, "nft", &["-f", "-"], &[], script)
        .with_context(|| format!("nft -f in {ns} of:\n{script}"))?;
    Ok(())
}

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The name iptables and nft use.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One port of a Service with a single endpoint, as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// `namespace/name:port`, e.g. `default/web:http`: kube-proxy's comments carry it.
    pub name: String,
    pub proto: Proto,
    /// The ClusterIP.
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// The NodePort, if the Service has one.
    pub node_port: Option<u16>,
    /// The endpoint (a pod) and its target port.
    pub endpoint: Ipv4Addr,
    pub target_port: u16,
}

impl ServicePort {
    /// kube-proxy names its per-service chains `KUBE-SVC-` + a hash; any stable,
    /// unique suffix does here.
    fn chain_suffix(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.name.bytes().chain(self.proto.name().bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        format!("{:016X}", h)
    }
}

/// kube-proxy's iptables-mode rules (nat and filter tables) for `ports`, as
/// `iptables-restore --noflush` input: KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with
/// DNAT, KUBE-NODEPORTS for node ports (marked for masquerade), KUBE-MARK-MASQ,
/// KUBE-POSTROUTING masquerading on the mark, and KUBE-FORWARD with its
/// `--ctstate INVALID -j DROP`. `cluster_cidr` is kube-proxy's `--cluster-cidr`:
/// traffic from outside it to a ClusterIP is masqueraded.
pub fn kube_proxy_iptables(ports: &[ServicePort], cluster_cidr: &str) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-NODEPORTS".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
    ];
    let mut rules = vec![
        // kube-proxy prepends its jumps to the built-in chains.
        "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-I POSTROUTING 1 -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".to_owned(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {KUBE_MARK_MASQ:#x}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {KUBE_MARK_MASQ:#x}/{KUBE_MARK_MASQ:#x} -j RETURN"),
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {KUBE_MARK_MASQ:#x}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
    ];
    for sp in ports {
        let (svc, sep, ext) = (
            format!("KUBE-SVC-{}", sp.chain_suffix()),
            format!("KUBE-SEP-{}", sp.chain_suffix()),
            format!("KUBE-EXT-{}", sp.chain_suffix()),
        );
        let (name, p) = (&sp.name, sp.proto.name());
        chains.extend([svc.clone(), sep.clone()]);
        rules.push(format!(
            "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{name} cluster IP\" -m {p} --dport {} -j {svc}",
            sp.cluster_ip, sp.port
        ));
        rules.push(format!(
            "-A {svc} ! -s {cluster_cidr} -d {}/32 -p {p} -m comment --comment \"{name} cluster IP\" -m {p} --dport {} -j KUBE-MARK-MASQ",
            sp.cluster_ip, sp.port
        ));
        rules.push(format!(
            "-A {svc} -m comment --comment \"{name} -> {}:{}\" -j {sep}",
            sp.endpoint, sp.target_port
        ));
        rules.push(format!(
            "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
            sp.endpoint
        ));
        rules.push(format!(
            "-A {sep} -p {p} -m comment --comment \"{name}\" -m {p} -j DNAT --to-destination {}:{}",
            sp.endpoint, sp.target_port
        ));
        if let Some(node_port) = sp.node_port {
            chains.push(ext.clone());
            rules.push(format!(
                "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{name}\" -m {p} --dport {node_port} -j {ext}"
            ));
            rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            rules.push(format!("-A {ext} -j {svc}"));
        }
    }
    rules.push("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".to_owned());
    let mut text = String::from("*nat\n");
    for chain in &chains {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in &rules {
        text.push_str(rule);
        text.push('\n');
    }
    text.push_str("COMMIT\n*filter\n:KUBE-FORWARD - [0:0]\n");
    text.push_str(
        "-I FORWARD 1 -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
    );
    text.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    text.push_str(&format!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {KUBE_MARK_MASQ:#x}/{KUBE_MARK_MASQ:#x} -j ACCEPT\n"
    ));
    text.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n");
    text
}

/// kube-proxy's nftables-mode table (`table ip kube-proxy`) for `ports` (ClusterIPs
/// only), as `nft -f` input in the shape its knftables transaction has (every chain
/// added before the rules that jump to it): the `service-ips` verdict map, one service
/// chain and one endpoint chain per port with its `dnat to`, masquerading on the mark,
/// and `ct state invalid drop` on the forward hook.
pub fn kube_proxy_nftables(ports: &[ServicePort], cluster_cidr: &str) -> String {
    const T: &str = "ip kube-proxy";
    let mark = KUBE_MARK_MASQ;
    let mut chains = vec![
        "add chain ip kube-proxy mark-for-masquerade".to_owned(),
        "add chain ip kube-proxy masquerading { type nat hook postrouting priority srcnat ; }"
            .to_owned(),
        "add chain ip kube-proxy services".to_owned(),
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }"
            .to_owned(),
        "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }".to_owned(),
        "add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }"
            .to_owned(),
    ];
    let mut rules = vec![
        format!("add rule {T} mark-for-masquerade mark set mark or {mark:#x}"),
        format!("add rule {T} masquerading mark and {mark:#x} == 0 return"),
        format!("add rule {T} masquerading mark set mark xor {mark:#x}"),
        format!("add rule {T} masquerading masquerade fully-random"),
        format!("add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"),
        format!("add rule {T} nat-prerouting jump services"),
        format!("add rule {T} nat-output jump services"),
        format!("add rule {T} filter-forward ct state invalid drop"),
    ];
    for sp in ports {
        let p = sp.proto.name();
        // `default/web:http` -> `default/web/tcp/http`, as kube-proxy names its chains.
        let (service, port_name) = sp.name.split_once(':').unwrap_or((&sp.name, ""));
        let id = format!("{service}/{p}/{port_name}");
        let hash = sp.chain_suffix();
        let svc = format!("service-{}-{id}", &hash[..8]);
        let ep = format!(
            "endpoint-{}-{id}__{}/{}",
            &hash[8..],
            sp.endpoint,
            sp.target_port
        );
        chains.push(format!("add chain {T} {svc}"));
        chains.push(format!("add chain {T} {ep}"));
        rules.push(format!(
            "add rule {T} {svc} ip daddr {} {p} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
            sp.cluster_ip, sp.port
        ));
        rules.push(format!(
            "add rule {T} {svc} numgen random mod 1 vmap {{ 0 : goto {ep} }}"
        ));
        rules.push(format!(
            "add rule {T} {ep} ip saddr {} jump mark-for-masquerade",
            sp.endpoint
        ));
        rules.push(format!(
            "add rule {T} {ep} meta l4proto {p} dnat to {}:{}",
            sp.endpoint, sp.target_port
        ));
        rules.push(format!(
            "add element {T} service-ips {{ {} . {p} . {} : goto {svc} }}",
            sp.cluster_ip, sp.port
        ));
    }
    let mut script = format!("add table {T} {{ comment \"rules for kube-proxy\" ; }}\n");
    script.push_str(&chains.join("\n"));
    script.push_str(&format!(
        "\nadd map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n"
    ));
    script.push_str(&rules.join("\n"));
    script.push('\n');
    script
}

/// A hostPort mapping made by Debian's CNI `portmap` plugin, called as a container
/// runtime calls it (chained after the bridge plugin, whose result it gets as
/// `prevResult`). Dropping it calls DEL (errors ignored; [`HostPort::del`] reports them).
#[derive(Debug)]
pub struct HostPort {
    node_ns: String,
    pod_ns: String,
    container_id: String,
    config: String,
    added: bool,
}

impl HostPort {
    /// `portmap` ADD inside `node_ns` for the pod in `pod_ns` (address `pod_ip` on
    /// `pod_cidr_prefix`, gateway `gateway`): `host_port` on the node to
    /// `container_port` in the pod, TCP.
    pub fn add(
        node_ns: &str,
        pod_ns: &str,
        pod_ip: Ipv4Addr,
        gateway: Ipv4Addr,
        host_port: u16,
        container_port: u16,
    ) -> anyhow::Result<HostPort> {
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "hgw-lab",
            "type": "portmap",
            "capabilities": { "portMappings": true },
            "runtimeConfig": {
                "portMappings": [
                    { "hostPort": host_port, "containerPort": container_port, "protocol": "tcp" }
                ]
            },
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    { "name": "cni0" },
                    { "name": "eth0", "sandbox": format!("/var/run/netns/{pod_ns}") }
                ],
                "ips": [
                    { "address": format!("{pod_ip}/24"), "gateway": gateway.to_string(), "interface": 1 }
                ]
            }
        })
        .to_string();
        let mut hp = HostPort {
            node_ns: node_ns.to_owned(),
            // A container id as a runtime makes one: unique per sandbox.
            container_id: format!("{pod_ns}-sandbox"),
            pod_ns: pod_ns.to_owned(),
            config,
            added: false,
        };
        hp.call("ADD")?;
        hp.added = true;
        Ok(hp)
    }

    /// `portmap` DEL: removes the mapping's chains and rules.
    pub fn del(&mut self) -> anyhow::Result<()> {
        if self.added {
            self.added = false;
            self.call("DEL")?;
        }
        Ok(())
    }

    fn call(&self, command: &str) -> anyhow::Result<Output> {
        crate::cni::exec_plugin(
            &self.node_ns,
            "portmap",
            command,
            &self.container_id,
            &self.pod_ns,
            &self.config,
        )
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        let _ = self.del();
    }
}

/// A host on the lab's switch that is no node (no agent, no route to any pod CIDR):
/// namespace `<lab id>-out` with `eth0` on the switch's `br0`. Deleted on drop (and by
/// [`Lab::down`], whose prefix it shares). Drop it before the lab.
#[derive(Debug)]
pub struct OutsideHost {
    /// Its namespace.
    pub ns: String,
    /// Its address on the switch's segment.
    pub ip: Ipv4Addr,
}

impl OutsideHost {
    /// Creates it with address `addr`/24 (on the uplinks' 172.31.0.0/24).
    pub fn add(lab: &Lab, addr: Ipv4Addr) -> anyhow::Result<OutsideHost> {
        let ns = format!("{}-out", lab.id);
        let sw = format!("{}-sw", lab.id);
        ip(&["netns", "add", &ns])?;
        // From here on Drop removes the namespace (and with it both veth ends).
        let host = OutsideHost { ns, ip: addr };
        let ns = &host.ns;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "out", "netns", &sw,
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &sw, "link", "set", "out", "master", "br0", "up"])?;
        Ok(host)
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        delete_namespace_quietly(&self.ns);
    }
}

/// What a [`tcp_request`] got back.
#[derive(Debug)]
pub struct TcpAnswer {
    /// Everything the client read, up to the server's close.
    pub reply: String,
    /// The peer address the server's accept returned (after any NAT on the way).
    pub server_saw: SocketAddr,
}

/// An HTTP-like exchange: a server in `server_ns` listening on `listen` accepts one
/// connection, reads the request, answers `HTTP/1.0 200 OK` with [`REPLY_BODY`] and
/// closes; the client in `client_ns` connects to `connect` (a Service, a hostPort, ...),
/// sends a GET and reads to EOF. Every step is bounded by `timeout`, so a path that
/// lost the flow gives an error, not a hang.
pub fn tcp_request(
    client_ns: &str,
    server_ns: &str,
    listen: SocketAddr,
    connect: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpAnswer> {
    let listener = in_netns(server_ns, || TcpListener::bind(listen))?
        .with_context(|| format!("binding a TCP listener on {listen} in {server_ns}"))?;
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let server = scope.spawn(|| serve_one(&listener, timeout, &done));
        let client = in_netns(client_ns, || http_get(connect, timeout))?
            .with_context(|| format!("TCP client in {client_ns} -> {connect}"));
        done.store(true, Ordering::Relaxed);
        let server = server
            .join()
            .map_err(|_| anyhow::anyhow!("TCP server thread panicked"))?;
        let reply = client?;
        let server_saw = server.with_context(|| format!("TCP server {listen} in {server_ns}"))?;
        Ok(TcpAnswer { reply, server_saw })
    })
}

/// The client side: connect, send a request, read the answer to EOF.
fn http_get(connect: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&connect, timeout).context("connecting")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {connect}\r\n\r\n").as_bytes())
        .context("sending the request")?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("reading the reply (got {} bytes)", reply.len()))?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// The server side: one connection, one answer; returns the peer address it saw.
/// Gives up at `timeout` after the start, or when the client is done (`done`).
fn serve_one(
    listener: &TcpListener,
    timeout: Duration,
    done: &AtomicBool,
) -> anyhow::Result<SocketAddr> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ensure!(
                    Instant::now() < deadline && !done.load(Ordering::Relaxed),
                    "no connection accepted"
                );
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the request from {peer}"))?;
        ensure!(n > 0, "{peer} closed before the end of its request");
        request.extend_from_slice(&buf[..n]);
    }
    stream
        .write_all(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{REPLY_BODY}",
                REPLY_BODY.len()
            )
            .as_bytes(),
        )
        .with_context(|| format!("answering {peer}"))?;
    // Dropping the stream closes it: the client reads to EOF.
    Ok(peer)
}

/// Whether `reply` is the answer a [`tcp_request`] server gives.
pub fn is_ok_reply(reply: &str) -> bool {
    reply.starts_with("HTTP/1.0 200 OK\r\n") && reply.ends_with(REPLY_BODY)
}

/// What a [`udp_requests`] exchange got back.
#[derive(Debug, Default)]
pub struct UdpAnswer {
    /// Rounds whose reply came back intact from the address the client sent to.
    pub answered: usize,
    /// Every source address replies came from (a reply from anywhere else than the
    /// address the client sent to is a translation that did not happen).
    pub reply_from: BTreeSet<SocketAddr>,
    /// Every source address the server saw.
    pub server_saw: BTreeSet<SocketAddr>,
}

/// `rounds` UDP request/response rounds, one at a time: the client in `client_ns`
/// sends to `connect` from one socket and waits up to a second for each answer; a
/// server in `server_ns` on `listen` echoes each datagram back to its sender.
pub fn udp_requests(
    client_ns: &str,
    server_ns: &str,
    listen: SocketAddr,
    connect: SocketAddr,
    rounds: usize,
) -> anyhow::Result<UdpAnswer> {
    let server = in_netns(server_ns, || UdpSocket::bind(listen))?
        .with_context(|| format!("binding a UDP socket on {listen} in {server_ns}"))?;
    server.set_read_timeout(Some(Duration::from_millis(50)))?;
    let any: IpAddr = match connect {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let client = in_netns(client_ns, || UdpSocket::bind((any, 0)))?
        .with_context(|| format!("binding a UDP socket in {client_ns}"))?;
    client.set_read_timeout(Some(Duration::from_millis(50)))?;
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let echo = scope.spawn(|| -> anyhow::Result<BTreeSet<SocketAddr>> {
            let mut saw = BTreeSet::new();
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                match server.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        saw.insert(from);
                        server.send_to(&buf[..n], from).context("echoing")?;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("receiving"),
                }
            }
            Ok(saw)
        });
        let mut answer = UdpAnswer::default();
        let result = (|| -> anyhow::Result<()> {
            let mut buf = [0u8; 2048];
            for round in 0..rounds {
                let request = format!("request {round} from {client_ns}");
                client
                    .send_to(request.as_bytes(), connect)
                    .with_context(|| format!("UDP {client_ns} -> {connect}: round {round}"))?;
                let deadline = Instant::now() + UDP_REPLY_WAIT;
                while Instant::now() < deadline {
                    match client.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            answer.reply_from.insert(from);
                            if from == connect && buf[..n] == *request.as_bytes() {
                                answer.answered += 1;
                                break;
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(e) => return Err(e).context("receiving a reply"),
                    }
                }
            }
            Ok(())
        })();
        done.store(true, Ordering::Relaxed);
        let saw = echo
            .join()
            .map_err(|_| anyhow::anyhow!("UDP echo thread panicked"))??;
        result?;
        answer.server_saw = saw;
        Ok(answer)
    })
}
