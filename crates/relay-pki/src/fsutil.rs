//! Atomic, permission-aware file writes and checked reads of private keys.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` atomically: a temporary file in the same directory with `mode`,
/// fsynced, then renamed over the target, then the directory fsynced. A crash leaves either the
/// old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name =
        path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` is filtered by the umask on creation; set it exactly (where modes are real).
        if let Err(e) = file.set_permissions(fs::Permissions::from_mode(mode))
            && !modes_are_synthetic(&tmp)
        {
            return Err(e);
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether `path` is on a filesystem whose permission bits are made up by the mount rather than
/// stored per file: SMB/CIFS, which is how Azure Files reaches Container Instances and Container
/// Apps. There every file shows the mount's `file_mode` (0777 unless set), `chmod` changes
/// nothing, and who can read a key is decided by the share's credentials, not by its mode.
pub fn modes_are_synthetic(path: &Path) -> bool {
    /// `CIFS_SUPER_MAGIC` and `SMB2_SUPER_MAGIC` from the kernel's `magic.h`.
    const SMB_MAGICS: [u64; 2] = [0xFF53_4D42, 0xFE53_4D42];
    rustix::fs::statfs(path).is_ok_and(|fs| SMB_MAGICS.contains(&(fs.f_type as u64)))
}

/// Reads a private key file, refusing one that group or others can read, except where modes are
/// synthetic ([`modes_are_synthetic`]) and checking them would refuse every key for nothing.
pub fn read_private_key_file(path: &Path) -> io::Result<Vec<u8>> {
    read_owner_only(path, "private keys")
}

/// Reads a file holding a secret (a shared secret, a token), held to the same rule as private
/// keys: readable by its owner only, where modes are real.
pub fn read_secret_file(path: &Path) -> io::Result<Vec<u8>> {
    read_owner_only(path, "secret files")
}

fn read_owner_only(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    let meta = fs::metadata(path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 && !modes_are_synthetic(path) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} has mode {mode:o}; {what} must be 0600 (run: chmod 600 {})", path.display(), path.display()),
        ));
    }
    fs::read(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_on_a_local_filesystem_are_real_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_atomic(&path, b"key", 0o644).unwrap();
        assert!(!modes_are_synthetic(&path), "a local temporary directory is not SMB");
        assert!(read_private_key_file(&path).is_err());
    }

    #[test]
    fn atomic_write_sets_the_exact_mode_and_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_atomic(&path, b"secret", 0o640).unwrap();
        let err = read_private_key_file(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("0600"));
    }
}
