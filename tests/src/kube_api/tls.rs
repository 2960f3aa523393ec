//! The server's certificates: a CA and a serving certificate it signs, made with the
//! `openssl` command. TLS is not optional: client-go (kubectl) sends a bearer token only
//! over TLS, so a plain-HTTP server would never see one.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio_rustls::TlsAcceptor;

/// Writes `ca.crt`, `server.crt` and `server.key` into `dir`; the serving certificate
/// names `ip`, 127.0.0.1 and localhost. The CA's path (for `--certificate-authority`
/// and a kubeconfig).
pub(crate) fn make_certs(dir: &Path, ip: IpAddr) -> anyhow::Result<PathBuf> {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-days", "2", "-subj", "/CN=hgw-lab-kube-ca"])
            .args(ec)
            .args(["-keyout", &p("ca.key"), "-out", &p("ca.crt")]),
    )?;
    openssl(
        Command::new("openssl")
            .args(["req", "-subj", "/CN=kube-apiserver"])
            .args(ec)
            .args(["-keyout", &p("server.key"), "-out", &p("server.csr")]),
    )?;
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n\
             subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost\n"
        ),
    )
    .context("writing server.ext")?;
    openssl(Command::new("openssl").args([
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-extfile",
        &p("server.ext"),
        "-out",
        &p("server.crt"),
    ]))?;
    Ok(dir.join("ca.crt"))
}

fn openssl(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            crate::cmd::describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The acceptor for the certificate [`make_certs`] wrote, on rustls' ring provider.
pub(crate) fn acceptor(dir: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .context("reading server.crt")?
        .collect::<Result<Vec<_>, _>>()
        .context("parsing server.crt")?;
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).context("server.key")?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the serving certificate")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
