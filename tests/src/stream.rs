//! A paced TCP stream between two pods, for checking that a connection survives
//! something done to the network while it runs.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::netns::in_netns;

const CHUNK: usize = 4096;
const PACE: Duration = Duration::from_millis(10);
const STALL: Duration = Duration::from_secs(20);

/// Streams `chunks` chunks of 4 KiB, one every 10 ms, from `client_ns` to
/// `server_ip:port` in `server_ns`, running `during` on the calling thread meanwhile.
/// Fails if the connection breaks, stalls for 20 s, or delivers a wrong byte; returns
/// what `during` returned.
pub fn paced_tcp_stream<T>(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    port: u16,
    chunks: usize,
    during: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let addr = SocketAddr::from((server_ip.into(), port));
    let listener = in_netns(server_ns, || TcpListener::bind(addr))?.context("listening")?;
    let client = in_netns(client_ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })?
    .context("connecting")?;
    let (server, _) = listener.accept().context("accepting")?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> anyhow::Result<()> {
            let mut client = client;
            client.set_write_timeout(Some(STALL))?;
            for i in 0..chunks {
                let chunk: Vec<u8> = (0..CHUNK).map(|j| ((i * CHUNK + j) % 251) as u8).collect();
                client
                    .write_all(&chunk)
                    .with_context(|| format!("sending chunk {i}"))?;
                std::thread::sleep(PACE);
            }
            Ok(())
        });
        let receiver = scope.spawn(move || -> anyhow::Result<usize> {
            let mut server = server;
            server.set_read_timeout(Some(STALL))?;
            let mut total = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = server
                    .read(&mut buf)
                    .with_context(|| format!("receiving after {total} bytes"))?;
                if n == 0 {
                    return Ok(total);
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    ensure!(
                        *b == ((total + k) % 251) as u8,
                        "stream corrupted at byte {}",
                        total + k
                    );
                }
                total += n;
            }
        });
        let result = during();
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        ensure!(
            received == chunks * CHUNK,
            "received {received} of {} bytes",
            chunks * CHUNK
        );
        result
    })
}
