//! Progress for long operations (start, restart, reload, scale, starting the local stack): a
//! spinner line on stderr when it is a terminal, nothing otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// A progress line.
pub struct Line {
    bar: Option<ProgressBar>,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// A spinner on a terminal, silence elsewhere.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            if let Ok(s) = ProgressStyle::with_template("{spinner} {msg}") {
                b.set_style(s);
            }
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Self { bar }
    }

    /// What is going on now.
    pub fn say(&mut self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }

    /// Clears the line.
    pub fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.done();
    }
}
