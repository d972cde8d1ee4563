//! pm2's `watch`: restart an app when its files change. One inotify watcher per process
//! (notify), its events filtered (dot-files, `node_modules`, the agent's own log folder and the
//! app's `ignore_watch` globs never count) and debounced: a burst of writes restarts once, after
//! `watch_delay` of quiet. Dropping the [`FileWatch`] stops it.

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running watch; stops on drop.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    cancel: CancellationToken,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What decides which paths count.
#[derive(Debug, Clone)]
pub struct Filter {
    roots: Vec<PathBuf>,
    ignore: GlobSet,
    skip_dir: PathBuf,
}

impl Filter {
    /// `ignore` are pm2's `ignore_watch` globs (matched against the path relative to its root
    /// and against each of its components); `skip_dir` (the agent's log folder) never counts.
    pub fn new(roots: Vec<PathBuf>, ignore: &[String], skip_dir: PathBuf) -> Result<Self, String> {
        let mut b = GlobSetBuilder::new();
        for g in ignore {
            b.add(Glob::new(g).map_err(|e| format!("ignore_watch '{g}' is not a glob: {e}"))?);
        }
        let ignore = b
            .build()
            .map_err(|e| format!("ignore_watch cannot be used: {e}"))?;
        Ok(Self {
            roots,
            ignore,
            skip_dir,
        })
    }

    /// True when a change of `path` should restart the app.
    pub fn counts(&self, path: &Path) -> bool {
        if path.starts_with(&self.skip_dir) {
            return false;
        }
        let rel = self
            .roots
            .iter()
            .find_map(|r| path.strip_prefix(r).ok())
            .unwrap_or(path);
        let hidden = rel.components().any(|c| {
            let s = c.as_os_str().to_string_lossy();
            s.starts_with('.') || s == "node_modules"
        });
        if hidden || self.ignore.is_match(rel) {
            return false;
        }
        !rel.components()
            .any(|c| self.ignore.is_match(c.as_os_str()))
    }
}

/// Starts watching; `changed` is called (from a task on `tracker`) with the first path of each
/// burst of changes, once the burst has been quiet for `delay`.
pub fn start(
    tracker: &TaskTracker,
    filter: Filter,
    delay: Duration,
    changed: impl Fn(PathBuf) + Send + 'static,
) -> Result<FileWatch, String> {
    let (tx, mut rx) = mpsc::channel::<PathBuf>(64);
    let f = filter.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_) | EventKind::Other) {
            return;
        }
        if let Some(p) = ev.paths.into_iter().find(|p| f.counts(p)) {
            // Full means a burst is already pending: one restart covers it.
            let _ = tx.try_send(p);
        }
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    for root in &filter.roots {
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    }
    let cancel = CancellationToken::new();
    tracker.spawn(cancel.clone().run_until_cancelled_owned(async move {
        while let Some(first) = rx.recv().await {
            // Quiet for `delay` before acting: editors and builds write in bursts.
            while let Ok(Some(_)) = tokio::time::timeout(delay, rx.recv()).await {}
            changed(first);
        }
    }));
    Ok(FileWatch {
        _watcher: watcher,
        cancel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_a_change() {
        let f = Filter::new(
            vec!["/srv/app".into()],
            &["*.log".into(), "tmp".into()],
            "/srv/app/home/logs".into(),
        )
        .unwrap();
        assert!(f.counts(Path::new("/srv/app/server.js")));
        assert!(f.counts(Path::new("/srv/app/lib/db.js")));
        assert!(!f.counts(Path::new("/srv/app/.git/index")));
        assert!(!f.counts(Path::new("/srv/app/node_modules/x/index.js")));
        assert!(!f.counts(Path::new("/srv/app/out.log")));
        assert!(!f.counts(Path::new("/srv/app/tmp/cache")));
        assert!(!f.counts(Path::new("/srv/app/home/logs/api-out-0.log")));
        assert!(Filter::new(vec![], &["[".into()], "/x".into()).is_err());
    }
}
