//! The benchmark's traffic, pod to pod, from sockets made inside the lab's namespaces
//! (a socket stays in the namespace it was created in, so the threads that drive it can
//! run anywhere): a 64-byte UDP flood on a flow the server answered first, TCP
//! request/response, TCP bulk streams; and the machine's CPU time from /proc/stat
//! around each measurement window.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hgw_tests::cost::pin_to_cpu;
use hgw_tests::in_netns;

use crate::util::Interrupt;

/// UDP payload size: the packets the forwarding cost shows in.
pub const UDP_PAYLOAD: usize = hgw_tests::cost::UDP_PAYLOAD;
/// Request and response size of the TCP request/response test.
pub const RR_SIZE: usize = 64;
const UDP_BATCH: usize = 32;
/// The datagram that opens a UDP flood, and its answer: not UDP_PAYLOAD long, so never
/// counted as a flood datagram.
const UDP_HELLO: &[u8] = b"hgwbench-hello";
const UDP_HELLO_ATTEMPTS: usize = 5;
const STREAM_CHUNK: usize = 128 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The sender's CPU; the receiver runs on the other one (when there is one).
const SENDER_CPU: usize = 0;

/// Where the traffic goes: a client namespace, a server namespace and address.
#[derive(Clone, Debug)]
pub struct Ends {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: IpAddr,
}

/// The measurement window and the Ctrl-C flag.
#[derive(Clone, Copy)]
pub struct Window<'a> {
    pub warmup: Duration,
    pub duration: Duration,
    pub interrupt: &'a Interrupt,
}

impl Window<'_> {
    /// Sleeps `d` in small steps; fails when Ctrl-C was pressed.
    fn sleep(&self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.interrupt.check()?;
            thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
        }
        Ok(())
    }
}

/// The other CPU than the sender's, or the same one on a 1-CPU machine.
pub fn other_cpu() -> usize {
    if thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        1
    } else {
        0
    }
}

/// CPU time from /proc/stat, in nanoseconds: the sender's CPU's busy time (its `cpuN`
/// line) and the machine's softirq time (the `cpu` line).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    /// The sender's CPU: user + nice + system + irq + softirq + steal. (The receiver
    /// polls on the other CPU, always busy.)
    pub sender_busy_ns: u64,
    /// All CPUs.
    pub softirq_ns: u64,
}

impl CpuTime {
    pub fn now() -> anyhow::Result<CpuTime> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let fields = |name: &str| -> anyhow::Result<Vec<u64>> {
            let line = stat
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .with_context(|| format!("/proc/stat has no `{name}` line"))?;
            Ok(line
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect())
        };
        let (all, sender) = (fields("cpu")?, fields(&format!("cpu{SENDER_CPU}"))?);
        let field = |f: &[u64], i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let busy = [0, 1, 2, 5, 6, 7].iter().map(|&i| field(&sender, i)).sum();
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|&hz| hz > 0)
            .unwrap_or(100);
        let ns = |ticks: u64| ticks * 1_000_000_000 / hz;
        Ok(CpuTime {
            sender_busy_ns: ns(busy),
            softirq_ns: ns(field(&all, 6)),
        })
    }
}

/// A UDP flood's result.
#[derive(Debug)]
pub struct UdpResult {
    /// Datagrams received per second in the window.
    pub pps: f64,
    /// The sender's CPU's busy time per received datagram in the window: sending and,
    /// in its softirq, the whole path to the receiver's socket.
    pub cpu_ns_per_pkt: f64,
    /// Softirq time (all CPUs) per received datagram in the window.
    pub softirq_ns_per_pkt: f64,
    /// Datagrams received over the whole run, warm-up included (for the path check).
    pub received_total: u64,
    /// Datagrams sent over the whole run.
    pub sent_total: u64,
}

/// 64-byte UDP datagrams as fast as one sender thread (pinned to CPU 0, `sendmmsg` in
/// batches) can send them; a receiver on the other CPU counts them (`recvmmsg`). On
/// veth, the whole forwarding path runs in the sender's softirq, so the rate is the
/// inverse of the path's per-packet cost on one CPU.
///
/// The flow is one conntrack has seen established before the flood starts: the server
/// answers a first datagram, and the client waits for that answer ([`open_udp_flow`]),
/// as a real request/stream protocol would. Every mode measures the same flow; in
/// hgw's `established` mode it is what lets the flood take the fast path.
pub fn udp_flood(ends: &Ends, w: Window<'_>) -> anyhow::Result<UdpResult> {
    let server = in_netns(&ends.server_ns, || UdpSocket::bind((ends.server_ip, 0)))?
        .with_context(|| format!("binding UDP on {} in {}", ends.server_ip, ends.server_ns))?;
    set_buffer(&server, libc::SO_RCVBUFFORCE, 16 << 20);
    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .context("UDP read timeout")?;
    let addr = server.local_addr().context("UDP server address")?;
    let client = in_netns(&ends.client_ns, || {
        let any: IpAddr = match ends.server_ip {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        UdpSocket::bind((any, 0))
    })?
    .with_context(|| format!("binding UDP in {}", ends.client_ns))?;
    client
        .connect(addr)
        .with_context(|| format!("connecting UDP to {addr}"))?;
    open_udp_flow(&client, &server)
        .with_context(|| format!("UDP {} -> {addr}: opening the flow", ends.client_ns))?;

    measure_udp(&server, addr, &ends.server_ns, &w, |done| {
        send_udp(&client, done)
    })
}

/// Runs `send` (it sends until `done`, returning how many it sent) against a receiver on
/// `server` for the window, and measures what arrived and the CPU it took.
fn measure_udp(
    server: &UdpSocket,
    addr: SocketAddr,
    server_ns: &str,
    w: &Window<'_>,
    send: impl FnOnce(&AtomicBool) -> anyhow::Result<u64> + Send,
) -> anyhow::Result<UdpResult> {
    let done = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    thread::scope(|s| -> anyhow::Result<UdpResult> {
        let rx = s.spawn(|| receive_udp(server, &done, &received));
        let tx = s.spawn(|| send(&done));
        let measured = (|| -> anyhow::Result<(u64, CpuTime, CpuTime, Duration)> {
            w.sleep(w.warmup)?;
            let (n0, c0, t0) = (
                received.load(Ordering::SeqCst),
                CpuTime::now()?,
                Instant::now(),
            );
            w.sleep(w.duration)?;
            let (n1, c1, t1) = (
                received.load(Ordering::SeqCst),
                CpuTime::now()?,
                Instant::now(),
            );
            Ok((n1 - n0, c0, c1, t1 - t0))
        })();
        done.store(true, Ordering::SeqCst);
        let sent = tx
            .join()
            .map_err(|_| anyhow::anyhow!("UDP sender panicked"))?;
        rx.join()
            .map_err(|_| anyhow::anyhow!("UDP receiver panicked"))??;
        let sent_total = sent?;
        let (n, c0, c1, elapsed) = measured?;
        if n == 0 {
            bail!("no UDP datagram arrived at {addr} in {server_ns}");
        }
        let n_f = n as f64;
        Ok(UdpResult {
            pps: n_f / elapsed.as_secs_f64(),
            cpu_ns_per_pkt: c1.sender_busy_ns.saturating_sub(c0.sender_busy_ns) as f64 / n_f,
            softirq_ns_per_pkt: c1.softirq_ns.saturating_sub(c0.softirq_ns) as f64 / n_f,
            received_total: received.load(Ordering::SeqCst),
            sent_total,
        })
    })
}

/// The client (connected) sends [`UDP_HELLO`], the server answers it, and this returns
/// once the answer is back: every node on the way has seen the flow answered.
fn open_udp_flow(client: &UdpSocket, server: &UdpSocket) -> anyhow::Result<()> {
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .context("UDP read timeout")?;
    let mut buf = [0u8; 64];
    for _ in 0..UDP_HELLO_ATTEMPTS {
        client
            .send(UDP_HELLO)
            .context("sending the opening datagram")?;
        // The server's read timeout is 50 ms: give the datagram up to 500 ms.
        let mut from = None;
        for _ in 0..10 {
            match server.recv_from(&mut buf) {
                Ok((n, src)) if buf[..n] == *UDP_HELLO => {
                    from = Some(src);
                    break;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("receiving the opening datagram"),
            }
        }
        let Some(from) = from else { continue };
        server
            .send_to(UDP_HELLO, from)
            .context("answering the opening datagram")?;
        match client.recv(&mut buf) {
            Ok(n) if buf[..n] == *UDP_HELLO => {
                // The flood's sender never reads: no timeout needed any more.
                client.set_read_timeout(None).context("UDP read timeout")?;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("receiving the answer"),
        }
    }
    bail!("no answer to the opening datagram in {UDP_HELLO_ATTEMPTS} attempts")
}

fn set_buffer(socket: &UdpSocket, option: libc::c_int, bytes: libc::c_int) {
    // SAFETY: a valid socket fd and a c_int option value of the size passed. A failure
    // only leaves the default buffer size, so it is ignored.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn send_udp(client: &UdpSocket, done: &AtomicBool) -> anyhow::Result<u64> {
    pin_to_cpu(SENDER_CPU)?;
    let mut payload = [0u8; UDP_PAYLOAD];
    payload[..8].copy_from_slice(b"hgwbench");
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain data; zero is a valid (empty) value for every field.
    let mut msgs: Vec<libc::mmsghdr> = (0..UDP_BATCH)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    while !done.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds UDP_BATCH valid headers, each pointing at `iov`, which
        // points at `payload`; all outlive the call. The socket is connected.
        let n = unsafe {
            libc::sendmmsg(
                client.as_raw_fd(),
                msgs.as_mut_ptr(),
                UDP_BATCH as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent += n as u64;
            continue;
        }
        let err = std::io::Error::last_os_error();
        // A full queue, or an ICMP error reported back: keep going.
        if !matches!(
            err.raw_os_error(),
            Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR)
        ) {
            return Err(err).context("sendmmsg");
        }
    }
    Ok(sent)
}

fn receive_udp(server: &UdpSocket, done: &AtomicBool, received: &AtomicU64) -> anyhow::Result<()> {
    pin_to_cpu(other_cpu())?;
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zero is a valid (empty) value for every field.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(&mut iovs) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // The receiver polls when it has a CPU of its own: one that sleeps is woken by the
    // sender's softirq (an IPI, about 1.5 us on a VM) whenever it has caught up, a cost
    // that depends on which side is faster, not on the path under test, and that made
    // the 1,000-flow numbers swing between modes. On one CPU it would only take the
    // sender's time; there it waits (SO_RCVTIMEO bounds the wait).
    let flags = if other_cpu() == SENDER_CPU {
        libc::MSG_WAITFORONE
    } else {
        libc::MSG_DONTWAIT
    };
    while !done.load(Ordering::Relaxed) {
        // SAFETY: BATCH headers, each with one iovec into its own buffer; all outlive
        // the call.
        let n = unsafe {
            libc::recvmmsg(
                server.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            let good = msgs[..n as usize]
                .iter()
                .filter(|m| m.msg_len as usize == UDP_PAYLOAD)
                .count();
            received.fetch_add(good as u64, Ordering::Relaxed);
            continue;
        }
        let err = std::io::Error::last_os_error();
        if !matches!(
            err.raw_os_error(),
            Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT)
        ) {
            return Err(err).context("recvmmsg");
        }
    }
    Ok(())
}

/// Request/response latency percentiles.
#[derive(Debug)]
pub struct RrResult {
    pub p50_us: f64,
    pub p99_us: f64,
    /// Transactions over the whole run, warm-up included (for the path check).
    pub transactions: u64,
}

/// One TCP connection, TCP_NODELAY: the client writes RR_SIZE bytes, the server echoes
/// them, the client times each round trip. Client pinned to `client_cpu`, server to
/// `server_cpu`.
pub fn tcp_rr(
    ends: &Ends,
    client_cpu: usize,
    server_cpu: usize,
    w: Window<'_>,
) -> anyhow::Result<RrResult> {
    let listener = listen(ends)?;
    let addr = listener.local_addr().context("listener address")?;
    thread::scope(|s| -> anyhow::Result<RrResult> {
        let server = s.spawn(|| -> anyhow::Result<()> {
            pin_to_cpu(server_cpu)?;
            let mut stream = accept(&listener)?;
            let mut buf = [0u8; RR_SIZE];
            loop {
                match stream.read_exact(&mut buf) {
                    Ok(()) => stream.write_all(&buf).context("echoing")?,
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e).context("reading a request"),
                }
            }
        });
        let client = s.spawn(|| -> anyhow::Result<(Vec<u32>, u64)> {
            let mut stream = connect(ends, addr)?;
            pin_to_cpu(client_cpu)?;
            let mut buf = [7u8; RR_SIZE];
            let start = Instant::now();
            let (measure_from, end) = (w.warmup, w.warmup + w.duration);
            let mut samples = Vec::with_capacity(1 << 20);
            let mut transactions = 0u64;
            loop {
                let elapsed = start.elapsed();
                if elapsed >= end || w.interrupt.is_set() {
                    break;
                }
                let t0 = Instant::now();
                stream.write_all(&buf).context("writing a request")?;
                stream.read_exact(&mut buf).context("reading a response")?;
                let rtt = t0.elapsed();
                transactions += 1;
                if elapsed >= measure_from {
                    samples.push(u32::try_from(rtt.as_nanos()).unwrap_or(u32::MAX));
                }
            }
            Ok((samples, transactions))
        });
        let client = client
            .join()
            .map_err(|_| anyhow::anyhow!("RR client panicked"))?;
        let server = server
            .join()
            .map_err(|_| anyhow::anyhow!("RR server panicked"))?;
        let (mut samples, transactions) = client?;
        server?;
        w.interrupt.check()?;
        if samples.is_empty() {
            bail!("no TCP request/response completed to {addr}");
        }
        samples.sort_unstable();
        let pct = |p: f64| {
            let i = ((samples.len() - 1) as f64 * p).round() as usize;
            f64::from(samples[i]) / 1000.0
        };
        Ok(RrResult {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            transactions,
        })
    })
}

/// TCP bulk throughput.
#[derive(Debug)]
pub struct StreamResult {
    pub gbit_s: f64,
    /// Bytes over the whole run, warm-up included.
    pub bytes_total: u64,
}

/// `streams` TCP connections, each written as fast as possible in 128 KiB chunks; the
/// server counts bytes in the window. Not pinned: the scheduler places them (as iperf3).
pub fn tcp_streams(ends: &Ends, streams: usize, w: Window<'_>) -> anyhow::Result<StreamResult> {
    let listener = listen(ends)?;
    let addr = listener.local_addr().context("listener address")?;
    let done = AtomicBool::new(false);
    let bytes = AtomicU64::new(0);
    let clients: Vec<TcpStream> = (0..streams)
        .map(|_| connect(ends, addr))
        .collect::<anyhow::Result<_>>()?;
    let servers: Vec<TcpStream> = (0..streams)
        .map(|_| accept(&listener))
        .collect::<anyhow::Result<_>>()?;
    thread::scope(|s| -> anyhow::Result<StreamResult> {
        let readers: Vec<_> = servers
            .into_iter()
            .map(|mut stream| {
                let bytes = &bytes;
                s.spawn(move || -> anyhow::Result<()> {
                    stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .context("read timeout")?;
                    let mut buf = vec![0u8; STREAM_CHUNK * 2];
                    loop {
                        let n = stream.read(&mut buf).context("reading a stream")?;
                        if n == 0 {
                            return Ok(());
                        }
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let writers: Vec<_> = clients
            .into_iter()
            .map(|mut stream| {
                let done = &done;
                s.spawn(move || -> anyhow::Result<()> {
                    stream
                        .set_write_timeout(Some(Duration::from_millis(200)))
                        .context("write timeout")?;
                    let buf = vec![0x5au8; STREAM_CHUNK];
                    while !done.load(Ordering::Relaxed) {
                        match stream.write(&buf) {
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(e) => return Err(e).context("writing a stream"),
                        }
                    }
                    // Closing the connection ends its reader.
                    Ok(())
                })
            })
            .collect();
        let measured = (|| -> anyhow::Result<(u64, Duration)> {
            w.sleep(w.warmup)?;
            let (b0, t0) = (bytes.load(Ordering::SeqCst), Instant::now());
            w.sleep(w.duration)?;
            let (b1, t1) = (bytes.load(Ordering::SeqCst), Instant::now());
            Ok((b1 - b0, t1 - t0))
        })();
        done.store(true, Ordering::SeqCst);
        let mut first_err = None;
        for h in writers.into_iter().chain(readers) {
            let r = h
                .join()
                .map_err(|_| anyhow::anyhow!("stream thread panicked"))
                .and_then(|r| r);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        let (b, elapsed) = measured?;
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(StreamResult {
            gbit_s: b as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
            bytes_total: bytes.load(Ordering::SeqCst),
        })
    })
}

fn listen(ends: &Ends) -> anyhow::Result<TcpListener> {
    in_netns(&ends.server_ns, || TcpListener::bind((ends.server_ip, 0)))?
        .with_context(|| format!("TCP listener on {} in {}", ends.server_ip, ends.server_ns))
}

fn connect(ends: &Ends, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = in_netns(&ends.client_ns, || {
        TcpStream::connect_timeout(&addr, IO_TIMEOUT)
    })?
    .with_context(|| format!("connecting to {addr} from {}", ends.client_ns))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(stream)
}

/// `accept` with a deadline: poll a non-blocking listener.
fn accept(listener: &TcpListener) -> anyhow::Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .context("non-blocking listener")?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).context("blocking stream")?;
                stream.set_nodelay(true).context("TCP_NODELAY")?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection within {IO_TIMEOUT:?}");
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e).context("accepting"),
        }
    }
}

/// A connection-rate (TCP_CRR-style) result.
#[derive(Debug)]
pub struct CrrResult {
    /// Connections completed per second in the window.
    pub per_s: f64,
    /// Connections completed over the whole run, warm-up included.
    pub total: u64,
}

/// New TCP connections one after another for the window, each: connect, a RR_SIZE
/// request, the echoed response, close (the client closes first, as netperf's
/// TCP_CRR does). Client and server both on CPU 0: the rate is the inverse of the
/// whole cost of a connection on one CPU, handshake and teardown included. The client
/// leaves its ports in TIME_WAIT (no reuse), so it takes CRR_LISTENERS server ports
/// in turn: each gives it a fresh set of 28,000 source ports.
pub fn tcp_crr(ends: &Ends, w: Window<'_>) -> anyhow::Result<CrrResult> {
    let listeners: Vec<TcpListener> = (0..CRR_LISTENERS)
        .map(|_| listen(ends))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<_>>()
        .context("listener address")?;
    let addr = addrs[0];
    for l in &listeners {
        // accept() honours SO_RCVTIMEO: the server wakes up to see the end of the run.
        set_timeout(l.as_raw_fd(), Duration::from_millis(100));
    }
    let done = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    thread::scope(|s| -> anyhow::Result<CrrResult> {
        let done = &done;
        let servers: Vec<_> = listeners
            .iter()
            .map(|listener| {
                s.spawn(move || -> anyhow::Result<()> {
                    pin_to_cpu(0)?;
                    let mut buf = [0u8; RR_SIZE];
                    while !done.load(Ordering::Relaxed) {
                        let mut stream = match listener.accept() {
                            Ok((stream, _)) => stream,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) =>
                            {
                                continue;
                            }
                            Err(e) => return Err(e).context("accepting"),
                        };
                        stream.set_nodelay(true).context("TCP_NODELAY")?;
                        stream
                            .set_read_timeout(Some(IO_TIMEOUT))
                            .context("read timeout")?;
                        stream.read_exact(&mut buf).context("reading a request")?;
                        stream.write_all(&buf).context("answering")?;
                        // Until the client's FIN: the client closes first.
                        let _ = stream.read(&mut buf).context("waiting for the close")?;
                    }
                    Ok(())
                })
            })
            .collect();
        let client = s.spawn(|| {
            in_netns(&ends.client_ns, || -> anyhow::Result<()> {
                pin_to_cpu(0)?;
                let mut buf = [7u8; RR_SIZE];
                for addr in addrs.iter().cycle() {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut stream = TcpStream::connect_timeout(addr, IO_TIMEOUT)
                        .with_context(|| format!("connecting to {addr}"))?;
                    stream.set_nodelay(true).context("TCP_NODELAY")?;
                    stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .context("read timeout")?;
                    stream.write_all(&buf).context("writing a request")?;
                    stream.read_exact(&mut buf).context("reading a response")?;
                    drop(stream);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        });
        let measured = (|| -> anyhow::Result<(u64, Duration)> {
            w.sleep(w.warmup)?;
            let (n0, t0) = (count.load(Ordering::SeqCst), Instant::now());
            w.sleep(w.duration)?;
            let (n1, t1) = (count.load(Ordering::SeqCst), Instant::now());
            Ok((n1 - n0, t1 - t0))
        })();
        done.store(true, Ordering::SeqCst);
        client
            .join()
            .map_err(|_| anyhow::anyhow!("CRR client panicked"))???;
        for server in servers {
            server
                .join()
                .map_err(|_| anyhow::anyhow!("CRR server panicked"))??;
        }
        let (n, elapsed) = measured?;
        if n == 0 {
            bail!("no TCP connection completed to {addr}");
        }
        Ok(CrrResult {
            per_s: n as f64 / elapsed.as_secs_f64(),
            total: count.load(Ordering::SeqCst),
        })
    })
}

fn set_timeout(fd: libc::c_int, d: Duration) {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    };
    // SAFETY: a valid fd and a timeval of the size passed. A failure only leaves the
    // socket without a timeout, which the caller's loop tolerates less well but safely.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// Server ports of [`tcp_crr`].
const CRR_LISTENERS: usize = 8;

/// Flows of [`udp_flows`] sent back to back from one socket before the next.
const FLOW_BATCH: usize = 8;

/// `flows` UDP flows at once, each its own client socket (a distinct source port) to
/// one server socket, each answered once first (conntrack sees every one established),
/// then 64-byte datagrams from all of them: one sender thread on CPU 0 takes the
/// sockets in turn, FLOW_BATCH datagrams each (`sendmmsg`); the receiver counts.
pub fn udp_flows(ends: &Ends, flows: usize, w: Window<'_>) -> anyhow::Result<UdpResult> {
    let server = in_netns(&ends.server_ns, || UdpSocket::bind((ends.server_ip, 0)))?
        .with_context(|| format!("binding UDP on {} in {}", ends.server_ip, ends.server_ns))?;
    set_buffer(&server, libc::SO_RCVBUFFORCE, 16 << 20);
    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .context("UDP read timeout")?;
    let addr = server.local_addr().context("UDP server address")?;
    let clients: Vec<UdpSocket> = in_netns(&ends.client_ns, || {
        let any: IpAddr = match ends.server_ip {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        (0..flows)
            .map(|_| {
                let s = UdpSocket::bind((any, 0))?;
                s.connect(addr)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?
    .with_context(|| format!("{flows} UDP sockets in {}", ends.client_ns))?;
    open_udp_flows(&clients, &server)
        .with_context(|| format!("UDP {} -> {addr}: opening {flows} flows", ends.client_ns))?;

    measure_udp(&server, addr, &ends.server_ns, &w, |done| {
        send_udp_flows(&clients, done)
    })
}

/// Every client (connected, non-blocking) sends [`UDP_HELLO`] until the server has
/// answered it and the answer is back: each flow seen answered on every node.
fn open_udp_flows(clients: &[UdpSocket], server: &UdpSocket) -> anyhow::Result<()> {
    let mut open = vec![false; clients.len()];
    let mut buf = [0u8; 64];
    for _ in 0..UDP_HELLO_ATTEMPTS {
        for (c, _) in clients.iter().zip(&open).filter(|(_, o)| !**o) {
            match c.send(UDP_HELLO) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("sending an opening datagram"),
            }
        }
        // Answer what arrives until 50 ms pass without a datagram.
        loop {
            match server.recv_from(&mut buf) {
                Ok((n, src)) if buf[..n] == *UDP_HELLO => {
                    server
                        .send_to(UDP_HELLO, src)
                        .context("answering an opening datagram")?;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break;
                }
                Err(e) => return Err(e).context("receiving the opening datagrams"),
            }
        }
        for (c, o) in clients.iter().zip(&mut open) {
            while let Ok(n) = c.recv(&mut buf) {
                if buf[..n] == *UDP_HELLO {
                    *o = true;
                }
            }
        }
        if open.iter().all(|&o| o) {
            return Ok(());
        }
    }
    let missing = open.iter().filter(|&&o| !o).count();
    bail!(
        "{missing} of {} flows had no answer after {UDP_HELLO_ATTEMPTS} attempts",
        clients.len()
    )
}

fn send_udp_flows(clients: &[UdpSocket], done: &AtomicBool) -> anyhow::Result<u64> {
    pin_to_cpu(SENDER_CPU)?;
    let mut payload = [0u8; UDP_PAYLOAD];
    payload[..8].copy_from_slice(b"hgwbench");
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain data; zero is a valid (empty) value for every field.
    let mut msgs: Vec<libc::mmsghdr> = (0..FLOW_BATCH)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    'run: loop {
        for c in clients {
            if done.load(Ordering::Relaxed) {
                break 'run;
            }
            // SAFETY: as in send_udp: FLOW_BATCH valid headers pointing at `iov` and
            // `payload`, alive for the call; the socket is connected.
            let n = unsafe {
                libc::sendmmsg(
                    c.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    FLOW_BATCH as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                sent += n as u64;
                continue;
            }
            let err = std::io::Error::last_os_error();
            // A full queue (the sockets are non-blocking), or an ICMP error: go on.
            if !matches!(
                err.raw_os_error(),
                Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR)
            ) {
                return Err(err).context("sendmmsg");
            }
        }
    }
    Ok(sent)
}
