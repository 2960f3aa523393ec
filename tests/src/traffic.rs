//! Traffic between pods: ping, a verified TCP transfer, counted UDP exchanges (one way,
//! or on a flow the server answered first, which conntrack counts as established).
//! Every operation is bounded by timeouts, so a broken path fails a test, never hangs it.

use std::collections::HashSet;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::netns::{in_netns, run_in};

/// Time allowed to connect, and between two reads or writes that make progress.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for a whole TCP transfer, whatever its size (1 MiB takes milliseconds).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the UDP receiver waits for stragglers after the last datagram was sent.
const UDP_GRACE: Duration = Duration::from_secs(2);
/// Pause between datagrams: a burst could overflow a queue (e.g. the neighbour queue
/// while the next hop's MAC is resolved), which would test the queue, not the path.
const UDP_GAP: Duration = Duration::from_micros(500);
const UDP_PAYLOAD: usize = 64;

/// `ip netns exec NS ping -c COUNT -W 1 -i 0.2 EXTRA TO`. The exit status tells whether
/// replies came back; the caller decides what it expects.
pub fn ping(
    from_ns: &str,
    to: impl Into<IpAddr>,
    count: u32,
    extra: &[&str],
) -> anyhow::Result<Output> {
    let count = count.to_string();
    let to = to.into().to_string();
    let mut args = vec!["-c", &count, "-W", "1", "-i", "0.2"];
    args.extend_from_slice(extra);
    args.push(&to);
    run_in(from_ns, "ping", &args)
}

/// The byte at offset `i` of a transfer: a pattern with period 251 (prime, so it never
/// lines up with segment or buffer sizes), which makes lost, duplicated or reordered
/// data visible, not just a short count.
fn pattern(i: usize) -> u8 {
    // The modulus keeps the value below 251, so the cast is lossless.
    ((i * 7 + 13) % 251) as u8
}

/// Sends `bytes` bytes over TCP from a socket in `client_ns` to a listener on
/// `server_ip` (an ephemeral port) in `server_ns`, and checks that exactly those bytes
/// arrived, in order.
pub fn tcp_transfer(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    bytes: usize,
) -> anyhow::Result<()> {
    let server_ip = server_ip.into();
    let listener = in_netns(server_ns, || TcpListener::bind((server_ip, 0)))?
        .with_context(|| format!("binding a TCP listener on {server_ip} in {server_ns}"))?;
    let addr = listener.local_addr().context("listener address")?;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    thread::scope(|scope| {
        let server = scope.spawn(|| receive_stream(&listener, deadline));
        let sent = in_netns(client_ns, || send_stream(addr, bytes, deadline))?
            .with_context(|| format!("TCP client in {client_ns} -> {addr}"));
        let received = server
            .join()
            .map_err(|_| anyhow::anyhow!("TCP server thread panicked"))?
            .with_context(|| format!("TCP server {addr} in {server_ns}"));
        sent?;
        let received = received?;
        ensure!(
            received == bytes,
            "TCP {client_ns} -> {addr}: sent {bytes} bytes, {received} arrived"
        );
        Ok(())
    })
}

fn send_stream(addr: SocketAddr, bytes: usize, deadline: Instant) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connecting")?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .context("setting write timeout")?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < bytes {
        ensure!(
            Instant::now() < deadline,
            "transfer took longer than {TRANSFER_TIMEOUT:?}"
        );
        let n = chunk.len().min(bytes - offset);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(offset + k);
        }
        stream
            .write_all(&chunk[..n])
            .with_context(|| format!("writing at offset {offset}"))?;
        offset += n;
    }
    // EOF tells the server the transfer is complete.
    stream
        .shutdown(std::net::Shutdown::Write)
        .context("shutting down the write side")?;
    Ok(())
}

/// Accepts one connection and reads it to EOF, checking the pattern; returns the count.
fn receive_stream(listener: &TcpListener, deadline: Instant) -> anyhow::Result<usize> {
    let mut stream = accept_before(listener, Instant::now() + IO_TIMEOUT)?;
    stream
        .set_nonblocking(false)
        .context("making the stream blocking")?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .context("setting read timeout")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        ensure!(
            Instant::now() < deadline,
            "transfer took longer than {TRANSFER_TIMEOUT:?}"
        );
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading after {total} bytes"))?;
        if n == 0 {
            return Ok(total);
        }
        if let Some(k) = (0..n).find(|&k| buf[k] != pattern(total + k)) {
            bail!("corrupted stream at byte {}", total + k);
        }
        total += n;
    }
}

/// `accept` with a deadline (std has no accept timeout): poll a non-blocking listener.
fn accept_before(listener: &TcpListener, deadline: Instant) -> anyhow::Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ensure!(
                    Instant::now() < deadline,
                    "no connection within {IO_TIMEOUT:?}"
                );
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting"),
        }
    }
}

/// Sends `packets` UDP datagrams from `client_ns` to a socket on `server_ip` in
/// `server_ns` and returns how many distinct, intact ones arrived (one way: the server
/// does not answer, so conntrack never sees the flow replied; for a flow the
/// `established` fast path takes, see [`udp_replied_exchange`]).
pub fn udp_exchange(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    packets: usize,
) -> anyhow::Result<usize> {
    let mut flow = UdpFlow::bind(client_ns, server_ns, server_ip.into())?;
    flow.send(packets)
}

/// Like [`udp_exchange`], on a flow conntrack has seen answered: the server replies to
/// a first datagram before the `packets` counted ones are sent ([`UdpFlow::open`]).
/// With `fast_path = "established"`, every counted datagram may take the fast path.
pub fn udp_replied_exchange(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    packets: usize,
) -> anyhow::Result<usize> {
    let mut flow = UdpFlow::open(client_ns, server_ns, server_ip)?;
    flow.send(packets)
}

/// What opens a [`UdpFlow`]: not a counted datagram (too short to carry a sequence
/// number and the pattern), so a duplicate of it is ignored by the counting.
const HELLO: &[u8] = b"hgw-hello";
/// Attempts at the opening exchange, each waiting this long for the answer: the first
/// datagram may wait for a neighbour resolution, or be lost to it.
const HELLO_ATTEMPTS: usize = 5;
const HELLO_WAIT: Duration = Duration::from_millis(500);

/// A UDP flow between two pods, kept open so several batches can be sent on it (the
/// same 5-tuple, so the same conntrack entry on every node it crosses).
pub struct UdpFlow {
    client: UdpSocket,
    server: UdpSocket,
    addr: SocketAddr,
    client_ns: String,
    /// The next datagram's sequence number.
    next: usize,
}

impl UdpFlow {
    /// Binds the server on `server_ip` (an ephemeral port) and the client; sends nothing.
    fn bind(client_ns: &str, server_ns: &str, server_ip: IpAddr) -> anyhow::Result<UdpFlow> {
        let server = in_netns(server_ns, || UdpSocket::bind((server_ip, 0)))?
            .with_context(|| format!("binding a UDP socket on {server_ip} in {server_ns}"))?;
        server
            .set_read_timeout(Some(Duration::from_millis(50)))
            .context("setting read timeout")?;
        let addr = server.local_addr().context("UDP server address")?;
        let any: IpAddr = match server_ip {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let client = in_netns(client_ns, || UdpSocket::bind((any, 0)))?
            .with_context(|| format!("binding a UDP socket in {client_ns}"))?;
        Ok(UdpFlow {
            client,
            server,
            addr,
            client_ns: client_ns.to_owned(),
            next: 0,
        })
    }

    /// A flow conntrack has accepted on every node it crosses: the client sends a
    /// first datagram, the server answers it, and only once the answer is back (so
    /// every node's entry is confirmed and has seen a reply) does this return. Fails
    /// if no answer comes back.
    pub fn open(
        client_ns: &str,
        server_ns: &str,
        server_ip: impl Into<IpAddr>,
    ) -> anyhow::Result<UdpFlow> {
        let flow = UdpFlow::bind(client_ns, server_ns, server_ip.into())?;
        flow.client
            .set_read_timeout(Some(HELLO_WAIT))
            .context("setting read timeout")?;
        let mut buf = [0u8; 64];
        for _ in 0..HELLO_ATTEMPTS {
            flow.client
                .send_to(HELLO, flow.addr)
                .with_context(|| format!("UDP {client_ns} -> {}: sending hello", flow.addr))?;
            let deadline = Instant::now() + HELLO_WAIT;
            let from = loop {
                match flow.server.recv_from(&mut buf) {
                    Ok((n, from)) if buf[..n] == *HELLO => break Some(from),
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if Instant::now() >= deadline {
                            break None;
                        }
                    }
                    Err(e) => return Err(e).context("receiving the hello"),
                }
            };
            let Some(from) = from else { continue };
            flow.server
                .send_to(HELLO, from)
                .with_context(|| format!("UDP {} -> {from}: answering", flow.addr))?;
            match flow.client.recv_from(&mut buf) {
                Ok((n, src)) if src == flow.addr && buf[..n] == *HELLO => return Ok(flow),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("receiving the answer"),
            }
        }
        bail!(
            "UDP {client_ns} -> {}: no answer to the opening datagram in {HELLO_ATTEMPTS} attempts",
            flow.addr
        )
    }

    /// The server's address (its port is ephemeral): for rules that match the flow.
    pub fn server_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `packets` datagrams on the flow and returns how many distinct, intact ones
    /// arrived (within 2 s of the last one sent).
    pub fn send(&mut self, packets: usize) -> anyhow::Result<usize> {
        let first = self.next;
        for seq in first..first + packets {
            self.client
                .send_to(&datagram(seq), self.addr)
                .with_context(|| {
                    format!(
                        "UDP {} -> {}: sending datagram {seq}",
                        self.client_ns, self.addr
                    )
                })?;
            thread::sleep(UDP_GAP);
        }
        self.next += packets;
        count_datagrams(
            &self.server,
            first..first + packets,
            Instant::now() + UDP_GRACE,
        )
    }
}

/// Datagram `seq`: its sequence number, then the pattern from there.
fn datagram(seq: usize) -> Vec<u8> {
    let mut d = (seq as u64).to_be_bytes().to_vec();
    d.extend((0..UDP_PAYLOAD - 8).map(|k| pattern(seq + k)));
    d
}

fn count_datagrams(
    server: &UdpSocket,
    seqs: std::ops::Range<usize>,
    deadline: Instant,
) -> anyhow::Result<usize> {
    let mut seen = HashSet::new();
    let mut buf = [0u8; 2048];
    while seen.len() < seqs.len() && Instant::now() < deadline {
        match server.recv(&mut buf) {
            Ok(n) => {
                let Some(seq) = buf.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                    continue;
                };
                let seq = u64::from_be_bytes(seq);
                // Only intact datagrams of this batch count.
                if let Ok(seq) = usize::try_from(seq)
                    && seqs.contains(&seq)
                    && buf[..n] == datagram(seq)[..]
                {
                    seen.insert(seq);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("receiving UDP"),
        }
    }
    Ok(seen.len())
}
