//! Runs an nftables script (`nft -f -`): hgw's tables are replaced as a whole, in one
//! transaction, so applying one twice is idempotent and a failure changes nothing.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0} (install nftables)")]
    Spawn(#[source] std::io::Error),
    #[error("nft -f -: {0}")]
    Failed(String),
}

pub fn apply(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| NftError::Failed(e.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| NftError::Failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}
