//! The kernel's sysctls the agent reads: numbers under /proc/sys, as the reader's
//! network namespace has them.

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {value:?} is not a number")]
    NotNumber { path: String, value: String },
}

impl SysctlError {
    /// Whether this kernel has no such sysctl.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The number at `path`.
pub fn read<T: std::str::FromStr>(path: &str) -> Result<T, SysctlError> {
    let text = std::fs::read_to_string(path).map_err(|source| SysctlError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.trim().parse().map_err(|_| SysctlError::NotNumber {
        path: path.to_owned(),
        value: text.trim().to_owned(),
    })
}
