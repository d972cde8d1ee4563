//! All human output goes through here: colour decided once (only on a TTY, never with
//! `NO_COLOR`), one table builder that hides empty columns, and pm2's units for memory, CPU and
//! uptime. Renderers are pure functions of their data, so they are snapshot-tested.

use crate::protocol::Status;
use crate::protocol::fleet::HostView;
use crate::protocol::reply::{LogTail, ProcessInfo};
use comfy_table::{
    Attribute, Cell, Color, ContentArrangement, ContentLineStyle, LineStyle, Table, TableStyle,
};
use std::io::IsTerminal;

/// pm2's look: rounded corners, a line under the header, none between rows.
const PM2_STYLE: TableStyle = TableStyle::new()
    .top_border(LineStyle::new('╭', '─', '┬', '╮'))
    .header_lines(ContentLineStyle::new('│', '│', '│'))
    .header_separator(LineStyle::new('├', '─', '┼', '┤'))
    .content_lines(ContentLineStyle::new('│', '│', '│'))
    .bottom_border(LineStyle::new('╰', '─', '┴', '╯'));

/// How output looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputStyle {
    /// Colour and attributes.
    pub colour: bool,
}

impl OutputStyle {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset.
    pub fn detect() -> Self {
        Self {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    /// No colour (tests, pipes).
    pub fn plain() -> Self {
        Self { colour: false }
    }

    /// A cell, coloured when colour is on.
    pub fn cell(&self, text: impl ToString, colour: Option<Color>, bold: bool) -> Cell {
        let mut c = Cell::new(text);
        if self.colour {
            if let Some(col) = colour {
                c = c.fg(col);
            }
            if bold {
                c = c.add_attribute(Attribute::Bold);
            }
        }
        c
    }

    /// Text wrapped in ANSI colour when colour is on.
    pub fn paint(&self, text: &str, colour: Color) -> String {
        if !self.colour {
            return text.to_string();
        }
        let code = match colour {
            Color::Red => 31,
            Color::Green => 32,
            Color::Yellow => 33,
            Color::Blue => 34,
            Color::Magenta => 35,
            Color::Cyan => 36,
            Color::Grey | Color::DarkGrey => 90,
            _ => 39,
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    fn status_colour(s: Status) -> Color {
        match s {
            Status::Online => Color::Green,
            Status::Launching | Status::Stopping | Status::WaitingRestart => Color::Yellow,
            Status::Stopped => Color::Grey,
            Status::Errored => Color::Red,
        }
    }

    fn table(&self) -> Table {
        let mut t = Table::new();
        t.load_style(PM2_STYLE)
            .set_content_arrangement(ContentArrangement::Disabled);
        // The decision was made once, in `detect`: the table follows it.
        if self.colour {
            t.enforce_styling();
        } else {
            t.force_no_tty();
        }
        t
    }
}

/// Memory as pm2 shows it: `40.1mb`, `812.0kb`, `1.2gb`.
pub fn memory(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.1}gb", b / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.1}mb", b / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1}kb", b / (1u64 << 10) as f64)
    } else {
        format!("{bytes}b")
    }
}

/// Uptime as pm2 shows it: `12s`, `5m`, `3h`, `2D`.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86_400 {
        format!("{}h", s / 3600)
    } else {
        format!("{}D", s / 86_400)
    }
}

/// CPU as pm2 shows it: `0%`, `12.5%`.
pub fn cpu(pct: f64) -> String {
    if pct < 0.05 {
        "0%".into()
    } else {
        format!("{pct:.1}%")
    }
}

/// One table builder: columns whose cells are all empty are left out.
struct Columns {
    heads: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
    empty: Vec<bool>,
}

impl Columns {
    fn new(heads: &[&'static str]) -> Self {
        Self {
            heads: heads.to_vec(),
            rows: vec![],
            empty: vec![true; heads.len()],
        }
    }

    fn row(&mut self, cells: Vec<(String, Cell)>) {
        for (i, (text, _)) in cells.iter().enumerate() {
            if !text.is_empty() {
                self.empty[i] = false;
            }
        }
        self.rows.push(cells.into_iter().map(|(_, c)| c).collect());
    }

    fn render(self, style: &OutputStyle, hideable: &[&str]) -> String {
        let keep: Vec<bool> = self
            .heads
            .iter()
            .zip(&self.empty)
            .map(|(h, e)| !(*e && hideable.contains(h)))
            .collect();
        let mut t = style.table();
        t.set_header(
            self.heads
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(h, _)| style.cell(h, Some(Color::Cyan), true)),
        );
        for row in self.rows {
            t.add_row(
                row.into_iter()
                    .zip(&keep)
                    .filter(|(_, k)| **k)
                    .map(|(c, _)| c),
            );
        }
        t.to_string()
    }
}

/// `flotilla ls`: pm2's table, plus the host.
pub fn process_table(procs: &[ProcessInfo], style: &OutputStyle, now_ms: u64) -> String {
    let mut cols = Columns::new(&[
        "id",
        "name",
        "namespace",
        "host",
        "mode",
        "pid",
        "uptime",
        "↺",
        "status",
        "cpu",
        "mem",
    ]);
    for p in procs {
        let m = &p.meta;
        let running = m.status.is_running() && m.pid != 0;
        let up = if running && m.pm_uptime > 0 {
            uptime(now_ms.saturating_sub(m.pm_uptime))
        } else {
            "0".into()
        };
        let pid = if running {
            m.pid.to_string()
        } else {
            "0".into()
        };
        let mode = match m.exec_mode {
            crate::protocol::ExecMode::Cluster => "cluster",
            crate::protocol::ExecMode::Fork => "fork",
        };
        let cells = vec![
            m.pm_id.to_string(),
            m.name.clone(),
            m.namespace.clone(),
            m.host.clone(),
            mode.to_string(),
            pid,
            up,
            m.restart_time.to_string(),
            m.status.as_str().to_string(),
            cpu(p.cpu),
            memory(p.memory),
        ];
        let styled = cells
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                let cell = match i {
                    1 => style.cell(&text, Some(Color::Cyan), true),
                    8 => style.cell(&text, Some(OutputStyle::status_colour(m.status)), true),
                    _ => style.cell(&text, None, false),
                };
                (text, cell)
            })
            .collect();
        cols.row(styled);
    }
    if procs.is_empty() {
        return "no process runs: `flotilla start app.js` starts one\n".into();
    }
    let mut s = cols.render(style, &["host", "namespace"]);
    s.push('\n');
    s
}

/// `flotilla describe`: one key/value table per process.
pub fn describe(p: &ProcessInfo, style: &OutputStyle, now_ms: u64) -> String {
    let m = &p.meta;
    let mut out = format!(
        " Describing process with id {} - name {}\n",
        m.pm_id,
        style.paint(&m.name, Color::Cyan)
    );
    let running = m.status.is_running() && m.pid != 0;
    let up = if running && m.pm_uptime > 0 {
        uptime(now_ms.saturating_sub(m.pm_uptime))
    } else {
        "0".into()
    };
    let rows: Vec<(&str, String)> = vec![
        ("status", m.status.as_str().to_string()),
        ("name", m.name.clone()),
        ("namespace", m.namespace.clone()),
        ("host", m.host.clone()),
        ("pid", m.pid.to_string()),
        ("instance", m.instance.to_string()),
        ("restarts", m.restart_time.to_string()),
        ("unstable restarts", p.unstable_restarts.to_string()),
        ("uptime", up),
        (
            "last exit code",
            p.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
        ),
        ("script path", p.script.display().to_string()),
        ("exec cwd", p.cwd.display().to_string()),
        ("interpreter", p.interpreter.clone()),
        (
            "exec mode",
            match m.exec_mode {
                crate::protocol::ExecMode::Cluster => "cluster_mode",
                crate::protocol::ExecMode::Fork => "fork_mode",
            }
            .into(),
        ),
        ("out log path", p.out_log.display().to_string()),
        ("error log path", p.err_log.display().to_string()),
        ("cpu", cpu(p.cpu)),
        ("memory", memory(p.memory)),
        ("messages dropped", p.dropped.to_string()),
        ("bad channel lines", p.ipc_errors.to_string()),
        ("app id", m.app_id.to_string()),
    ];
    let mut t = style.table();
    for (k, v) in rows {
        let cell = if k == "status" {
            style.cell(&v, Some(OutputStyle::status_colour(m.status)), true)
        } else {
            style.cell(&v, None, false)
        };
        t.add_row(vec![style.cell(k, None, true), cell]);
    }
    out.push_str(&t.to_string());
    out.push('\n');
    out
}

/// `flotilla logs`: pm2's "last N lines" blocks.
pub fn log_tails(tails: &[LogTail], style: &OutputStyle) -> String {
    let mut out = String::new();
    for t in tails {
        let head = format!(
            "{} last {} lines{}:",
            t.path.display(),
            t.lines.len(),
            if t.host.is_empty() {
                String::new()
            } else {
                format!(" (on {})", t.host)
            }
        );
        out.push_str(&style.paint(&head, Color::Grey));
        out.push('\n');
        for l in &t.lines {
            out.push_str(&log_line(t.pm_id, &t.name, &t.stream, l, style));
            out.push('\n');
        }
        if t.truncated {
            out.push_str("(earlier lines left out: the reply would have been too large)\n");
        }
        out.push('\n');
    }
    out
}

/// One log line as `logs` prints it: `0|api  | text` (stderr lines in red).
pub fn log_line(pm_id: u32, name: &str, stream: &str, line: &str, style: &OutputStyle) -> String {
    let prefix = format!("{pm_id}|{name}");
    let prefix = if stream == "err" {
        style.paint(&format!("{prefix:<12}|"), Color::Red)
    } else {
        style.paint(&format!("{prefix:<12}|"), Color::Green)
    };
    format!("{prefix} {line}")
}

/// `flotilla info` hosts.
pub fn host_table(hosts: &[HostView], style: &OutputStyle) -> String {
    if hosts.is_empty() {
        return "no agent has been heard from\n".into();
    }
    let mut cols = Columns::new(&[
        "host",
        "state",
        "labels",
        "processes",
        "online",
        "cpus",
        "load",
        "mem free",
        "agent mem",
        "version",
    ]);
    for h in hosts {
        let labels = h
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let state_colour = if h.state == "online" {
            Color::Green
        } else {
            Color::Red
        };
        let cells = vec![
            (h.host.clone(), style.cell(&h.host, Some(Color::Cyan), true)),
            (
                h.state.clone(),
                style.cell(&h.state, Some(state_colour), true),
            ),
            (labels.clone(), style.cell(&labels, None, false)),
            (
                h.processes.to_string(),
                style.cell(h.processes, None, false),
            ),
            (h.online.to_string(), style.cell(h.online, None, false)),
            (h.cpus.to_string(), style.cell(h.cpus, None, false)),
            (
                format!("{:.2}", h.load1),
                style.cell(format!("{:.2}", h.load1), None, false),
            ),
            (
                memory(h.mem_available),
                style.cell(memory(h.mem_available), None, false),
            ),
            (
                memory(h.agent_memory),
                style.cell(memory(h.agent_memory), None, false),
            ),
            (h.version.clone(), style.cell(&h.version, None, false)),
        ];
        cols.row(cells);
    }
    let mut s = cols.render(style, &["labels"]);
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ExecMode, ProcessMeta};

    fn proc(id: u32, name: &str, status: Status, host: &str) -> ProcessInfo {
        ProcessInfo {
            meta: ProcessMeta {
                pm_id: id,
                name: name.into(),
                namespace: "default".into(),
                rev: None,
                host: host.into(),
                pid: if status == Status::Online {
                    4000 + id
                } else {
                    0
                },
                instance: id,
                exec_mode: ExecMode::Cluster,
                status,
                restart_time: id,
                pm_uptime: 1_000_000,
                app_id: uuid::Uuid::nil(),
            },
            cpu: id as f64 * 1.25,
            memory: 40 << 20,
            dropped: 0,
            ipc_errors: 0,
            unstable_restarts: 0,
            exit_code: None,
            script: "/srv/api/server.js".into(),
            cwd: "/srv/api".into(),
            interpreter: "node".into(),
            out_log: "/home/u/.flotilla/logs/api-out-0.log".into(),
            err_log: "/home/u/.flotilla/logs/api-error-0.log".into(),
        }
    }

    #[test]
    fn units_as_pm2_shows_them() {
        assert_eq!(memory(42_100_000), "40.1mb");
        assert_eq!(memory(900), "900b");
        assert_eq!(memory(3 << 30), "3.0gb");
        assert_eq!(uptime(59_999), "59s");
        assert_eq!(uptime(5 * 60_000), "5m");
        assert_eq!(uptime(3 * 3_600_000), "3h");
        assert_eq!(uptime(2 * 86_400_000), "2D");
        assert_eq!(cpu(0.0), "0%");
        assert_eq!(cpu(12.34), "12.3%");
    }

    #[test]
    fn ls_table() {
        let procs = [
            proc(0, "api", Status::Online, "web-1"),
            proc(1, "api", Status::Online, "web-2"),
            proc(2, "api", Status::Errored, "web-1"),
            proc(3, "worker", Status::Stopped, "web-2"),
        ];
        insta::assert_snapshot!(process_table(
            &procs,
            &OutputStyle::plain(),
            1_000_000 + 125_000
        ));
        assert!(process_table(&[], &OutputStyle::plain(), 0).contains("no process runs"));
        // Colour only when asked for.
        let coloured = process_table(&procs, &OutputStyle { colour: true }, 0);
        assert!(coloured.contains("\x1b["));
        assert!(!process_table(&procs, &OutputStyle::plain(), 0).contains("\x1b["));
    }

    #[test]
    fn describe_table() {
        insta::assert_snapshot!(describe(
            &proc(1, "api", Status::Online, "web-1"),
            &OutputStyle::plain(),
            1_000_000 + 3_700_000
        ));
    }

    #[test]
    fn log_blocks() {
        let t = LogTail {
            pm_id: 0,
            name: "api".into(),
            namespace: "default".into(),
            host: "web-1".into(),
            stream: "out".into(),
            path: "/home/u/.flotilla/logs/api-out-0.log".into(),
            lines: vec!["listening on 3000".into(), "GET / 200".into()],
            truncated: false,
        };
        insta::assert_snapshot!(log_tails(&[t], &OutputStyle::plain()));
    }

    #[test]
    fn hosts() {
        let h = HostView {
            host: "web-1".into(),
            labels: [("zone".to_string(), "eu".to_string())].into(),
            version: "0.1.0".into(),
            state: "online".into(),
            last_seen_ms: 200,
            processes: 4,
            online: 4,
            cpus: 2,
            load1: 0.5,
            mem_total: 24 << 30,
            mem_available: 20 << 30,
            agent_memory: 8 << 20,
        };
        insta::assert_snapshot!(host_table(&[h], &OutputStyle::plain()));
    }
}
