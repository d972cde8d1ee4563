//! The agent's local copy of its assignment, so a missing controller or a NATS outage
//! never stops or forgets running workers. Written atomically: a temporary file in the same
//! folder, fsync, rename over the old copy, fsync the folder. A crash at any point leaves either
//! the old copy or the new one, never a torn file (pm2 users lost process lists this way, #2653).

use crate::protocol::state::Assignment;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The local copy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// I/O failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an assignment.
    #[error(
        "{path} is not a valid assignment ({source}): move it away; the agent gets its assignment from the controller again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// `<home>/assignment.json`
pub fn path(home: &Path) -> PathBuf {
    home.join("assignment.json")
}

/// Writes `a` to `file` atomically and durably.
pub fn save(file: &Path, a: &Assignment) -> Result<(), LocalError> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| LocalError::Io { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = file.with_extension(format!("json.tmp-{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(a).expect("assignments always serialise");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    std::fs::rename(&tmp, file).map_err(io("replacing", file))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    Ok(())
}

/// Reads the local copy; `None` when there is none yet.
pub fn load(file: &Path) -> Result<Option<Assignment>, LocalError> {
    match std::fs::read(file) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| LocalError::Corrupt {
                    path: file.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LocalError::Io {
            what: "reading",
            path: file.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AppSpec;
    use crate::protocol::state::AssignedApp;

    #[test]
    fn round_trip_replaces_atomically_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let f = path(d.path());
        assert_eq!(load(&f).unwrap(), None);
        let mut a = Assignment {
            host: "h".into(),
            apps: vec![AssignedApp {
                spec: AppSpec::new("api", "/srv/a.js"),
                running: true,
                stopped: Default::default(),
            }],
        };
        save(&f, &a).unwrap();
        a.apps[0].running = false;
        save(&f, &a).unwrap();
        assert_eq!(load(&f).unwrap(), Some(a));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["assignment.json"]);
    }

    #[test]
    fn a_corrupt_copy_is_refused_with_its_path_and_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let f = path(d.path());
        std::fs::write(&f, b"{\"host\": \"h\", \"apps\": [").unwrap();
        let e = load(&f).unwrap_err().to_string();
        assert!(
            e.contains("assignment.json") && e.contains("move it away"),
            "{e}"
        );
    }
}
