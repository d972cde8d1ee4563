//! Finding a program as `execvp` would: the one PATH lookup every role uses (the agent for
//! interpreters, the local stack for `nats-server`, the CLI for `node`).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `name` on `path_var` (else `$PATH`), or `name` itself when it has a slash; only an
/// executable regular file counts.
pub fn which(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = match path_var {
        Some(p) => p.to_owned(),
        None => std::env::var_os("PATH")?,
    };
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables_only() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([d.path()]).unwrap();
        assert_eq!(which("tool", Some(&path)), None, "not executable yet");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(which("tool", Some(&path)), Some(exe.clone()));
        assert_eq!(which("nothing-here", Some(&path)), None);
        assert_eq!(which(exe.to_str().unwrap(), None), Some(exe));
        assert_eq!(which(d.path().to_str().unwrap(), None), None, "a folder");
    }
}
