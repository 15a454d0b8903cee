//! Files seg keeps private. Files of shared secrets, as the replicas of a fleet hold them (a
//! mounted Kubernetes Secret):
//! one secret per non-empty line, at least [`MIN_SECRET`] bytes each. The first line seals
//! (encrypts), every line opens, so a key rotates without a restart: add the new secret as the
//! first line on every replica, wait until each has reloaded, and later remove the old line.
//! Read by the TLS session tickets and the fleet's shared entries. And the files seg writes
//! that name accounts (the identity snapshot, the fleet's block list): owner only, replaced
//! whole ([`write_private`]).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// The shortest secret accepted: 256 bits.
pub const MIN_SECRET: usize = 32;

/// The secrets of `path`, first line first; the error says what is wrong with the file.
pub fn read_secret_lines(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secrets: Vec<Vec<u8>> = text
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    if secrets.is_empty() {
        return Err(format!("{} holds no key", path.display()));
    }
    if let Some(n) = secrets.iter().position(|s| s.len() < MIN_SECRET) {
        return Err(format!("key {} is shorter than {MIN_SECRET} bytes", n + 1));
    }
    Ok(secrets)
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename: a reader
/// sees the old file or the whole new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_secrets_and_short_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("seg-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(
            &path,
            format!("{}\r\n\n{}\n", "a".repeat(32), "b".repeat(40)),
        )
        .unwrap();
        let secrets = read_secret_lines(&path).unwrap();
        assert_eq!(secrets, vec![vec![b'a'; 32], vec![b'b'; 40]]);
        std::fs::write(&path, format!("{}\nshort\n", "a".repeat(32))).unwrap();
        assert_eq!(
            read_secret_lines(&path).unwrap_err(),
            "key 2 is shorter than 32 bytes"
        );
        std::fs::write(&path, "\n\n").unwrap();
        assert!(read_secret_lines(&path)
            .unwrap_err()
            .ends_with("holds no key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
