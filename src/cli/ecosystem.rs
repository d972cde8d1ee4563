//! Ecosystem files, as pm2 users write them: TOML, YAML or JSON with pm2's option names
//! (`apps: [{name, script, instances, env, env_<profile>, ...}]`), or pm2's own
//! `ecosystem.config.js`, evaluated with node. Relative `script` and `cwd` are relative to the
//! file's folder. Unknown options are warned about (file, app, option), never silently dropped;
//! syntax errors name the file, line and column.

use crate::protocol::app::ExitCodes;
use crate::protocol::names::{self, NameKind};
use crate::protocol::{AppSpec, ExecMode, duration};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// An ecosystem file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EcosystemError {
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Syntax error, with where.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value has the wrong form.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What, where and how to fix.
        message: String,
    },
}

/// What a file holds.
#[derive(Debug, Clone)]
pub struct Ecosystem {
    /// The apps, in file order.
    pub apps: Vec<AppSpec>,
    /// Options we ignored, one line each (file, app, option, why).
    pub warnings: Vec<String>,
}

/// pm2 options we understand but do not act on yet, with the reason shown in the warning.
const IGNORED: &[(&str, &str)] = &[
    (
        "watch_options",
        "chokidar-specific: Flotilla watches with inotify",
    ),
    ("merge_logs", "logs are always per process"),
    ("combine_logs", "logs are always per process"),
    ("out_file", "logs go to $FLOTILLA_HOME/logs"),
    ("error_file", "logs go to $FLOTILLA_HOME/logs"),
    ("log_file", "logs go to $FLOTILLA_HOME/logs"),
    ("pid_file", "no pid files: `ls` shows pids"),
    ("log_date_format", "events carry `at`"),
    ("time", "events carry `at`"),
    ("vizion", "pm2-specific"),
    ("pmx", "pm2-specific"),
    ("automation", "pm2-specific"),
    ("source_map_support", "pm2-specific"),
    ("autostart", "not supported yet"),
    ("increment_var", "not supported yet"),
    ("uid", "not supported yet"),
    ("gid", "not supported yet"),
    ("user", "not supported yet"),
];

/// Reads `path`, applying `env_<profile>` when `profile` is given. `cpus` resolves
/// `instances: 0 | "max" | -n` as pm2 does.
pub fn load(path: &Path, profile: Option<&str>, cpus: u32) -> Result<Ecosystem, EcosystemError> {
    let shown = path.display().to_string();
    let root = parse_file(path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let apps = match &root {
        Value::Object(o) => match o.get("apps") {
            Some(Value::Array(a)) => a.clone(),
            Some(v @ Value::Object(_)) => vec![v.clone()],
            Some(_) => return Err(invalid(&shown, "`apps` must be a list of apps")),
            None if o.contains_key("script") => vec![root.clone()],
            None => {
                return Err(invalid(
                    &shown,
                    "no `apps` list: write `apps = [{ name = \"api\", script = \"server.js\" }]` (or pm2's JSON/YAML equivalent)",
                ));
            }
        },
        Value::Array(a) => a.clone(),
        _ => return Err(invalid(&shown, "expected an object with an `apps` list")),
    };
    if apps.is_empty() {
        return Err(invalid(&shown, "the `apps` list is empty"));
    }
    let mut out = Ecosystem {
        apps: Vec::with_capacity(apps.len()),
        warnings: vec![],
    };
    if let Some(p) = profile
        && !apps.iter().any(|a| a.get(format!("env_{p}")).is_some())
    {
        out.warnings.push(format!(
            "{shown}: no app has `env_{p}`: --env {p} changes nothing (pm2 selects `env_<profile>` this way)"
        ));
    }
    for (i, app) in apps.iter().enumerate() {
        let Value::Object(app) = app else {
            return Err(invalid(&shown, format!("app #{} is not an object", i + 1)));
        };
        out.apps.push(convert(
            app,
            &dir,
            profile,
            cpus,
            &shown,
            i,
            &mut out.warnings,
        )?);
    }
    Ok(out)
}

fn invalid(path: &str, message: impl Into<String>) -> EcosystemError {
    EcosystemError::Invalid {
        path: path.to_string(),
        message: message.into(),
    }
}

fn syntax(path: &str, line: usize, column: usize, message: impl Into<String>) -> EcosystemError {
    EcosystemError::Syntax {
        path: path.to_string(),
        line,
        column,
        message: message.into(),
    }
}

fn parse_file(path: &Path) -> Result<Value, EcosystemError> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".js") || name.ends_with(".cjs") || name.ends_with(".mjs") {
        return eval_js(path);
    }
    let text = std::fs::read_to_string(path).map_err(|source| EcosystemError::Read {
        path: shown.clone(),
        source,
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match ext {
        "toml" => toml::from_str::<Value>(&text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
            syntax(&shown, line, column, e.message().to_string())
        }),
        "yaml" | "yml" => serde_yaml_ng::from_str::<Value>(&text).map_err(|e| {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            syntax(&shown, line, column, e.to_string())
        }),
        "json" => serde_json::from_str::<Value>(&text)
            .map_err(|e| syntax(&shown, e.line(), e.column(), e.to_string())),
        _ => Err(invalid(
            &shown,
            "unknown kind of ecosystem file: name it .toml, .yaml, .yml, .json or .config.js",
        )),
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// pm2's `ecosystem.config.js`: `module.exports = { apps: [...] }`, evaluated with node.
fn eval_js(path: &Path) -> Result<Value, EcosystemError> {
    let shown = path.display().to_string();
    let abs = std::fs::canonicalize(path).map_err(|source| EcosystemError::Read {
        path: shown.clone(),
        source,
    })?;
    let script = "const m = require(process.argv[1]); \
                  Promise.resolve(m && m.default !== undefined ? m.default : m) \
                  .then(c => process.stdout.write(JSON.stringify(c)))";
    let out = std::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(&abs)
        .output()
        .map_err(|e| {
            invalid(
                &shown,
                format!(
                    "evaluating it needs node, which could not be run ({e}): install Node.js, or write the apps as ecosystem.json/.yaml/.toml"
                ),
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("node failed")
            .trim();
        return Err(invalid(
            &shown,
            format!("node could not evaluate it: {first}"),
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| invalid(&shown, format!("it did not export plain data (JSON): {e}")))
}

fn convert(
    app: &Map<String, Value>,
    dir: &Path,
    profile: Option<&str>,
    cpus: u32,
    file: &str,
    index: usize,
    warnings: &mut Vec<String>,
) -> Result<AppSpec, EcosystemError> {
    let label = app
        .get("name")
        .and_then(Value::as_str)
        .map_or_else(|| format!("app #{}", index + 1), |n| format!("app '{n}'"));
    let bad = |key: &str, want: &str| invalid(file, format!("{label}: `{key}` must be {want}"));
    let script = app
        .get("script")
        .or_else(|| app.get("exec"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                file,
                format!("{label} has no `script`: name the file to run"),
            )
        })?;
    let cwd = match app.get("cwd") {
        Some(Value::String(c)) => dir.join(c),
        Some(_) => return Err(bad("cwd", "a path")),
        None => dir.to_path_buf(),
    };
    let script_path = cwd.join(script);
    let name = match app.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(bad("name", "a string")),
        None => Path::new(script)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("app")
            .to_string(),
    };
    names::validate(NameKind::App, &name).map_err(|e| invalid(file, format!("{label}: {e}")))?;
    let mut spec = AppSpec::new(&name, &script_path);
    spec.cwd = Some(cwd);
    for (key, value) in app {
        let key = key.as_str();
        match key {
            "name" | "script" | "exec" | "cwd" => {}
            "namespace" => {
                let ns = value.as_str().ok_or_else(|| bad(key, "a string"))?;
                names::validate(NameKind::Namespace, ns)
                    .map_err(|e| invalid(file, format!("{label}: {e}")))?;
                spec.namespace = ns.to_string();
            }
            "args" => spec.args = words(value).ok_or_else(|| bad(key, "a string or a list of strings"))?,
            "interpreter_args" | "node_args" => {
                spec.interpreter_args =
                    words(value).ok_or_else(|| bad(key, "a string or a list of strings"))?
            }
            "interpreter" | "exec_interpreter" => {
                spec.interpreter = Some(value.as_str().ok_or_else(|| bad(key, "a string"))?.into())
            }
            "instances" => spec.instances = Some(instances(value, cpus).ok_or_else(|| bad(key, "a number, or \"max\""))?),
            "exec_mode" => {
                spec.exec_mode = Some(match value.as_str() {
                    Some("cluster" | "cluster_mode") => ExecMode::Cluster,
                    Some("fork" | "fork_mode") => ExecMode::Fork,
                    _ => return Err(bad(key, "\"cluster\" or \"fork\"")),
                })
            }
            "env" => merge_env(&mut spec, value).ok_or_else(|| bad(key, "a table of NAME = value"))?,
            k if k.starts_with("env_") => {
                if Some(&k[4..]) == profile {
                    // applied after the loop, so it wins over `env` whatever the order
                } else if !value.is_object() {
                    return Err(bad(key, "a table of NAME = value"));
                }
            }
            "autorestart" => spec.autorestart = flag(value).ok_or_else(|| bad(key, "true or false"))?,
            "wait_ready" => spec.wait_ready = flag(value).ok_or_else(|| bad(key, "true or false"))?,
            "treekill" => spec.treekill = flag(value).ok_or_else(|| bad(key, "true or false"))?,
            "shutdown_with_message" => {
                spec.shutdown_with_message = flag(value).ok_or_else(|| bad(key, "true or false"))?
            }
            "max_restarts" => {
                spec.max_restarts = value
                    .as_u64()
                    .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(key, "a whole number"))?
            }
            "min_uptime" => spec.min_uptime = dur(value).ok_or_else(|| bad(key, "a duration (1000, \"1s\")"))?,
            "restart_delay" => spec.restart_delay = dur(value).ok_or_else(|| bad(key, "a duration (ms or \"2s\")"))?,
            "exp_backoff_restart_delay" => {
                spec.exp_backoff_restart_delay = Some(dur(value).ok_or_else(|| bad(key, "a duration (ms or \"100ms\")"))?)
            }
            "kill_timeout" => spec.kill_timeout = dur(value).ok_or_else(|| bad(key, "a duration (ms or \"5s\")"))?,
            "listen_timeout" => spec.listen_timeout = dur(value).ok_or_else(|| bad(key, "a duration (ms or \"3s\")"))?,
            "kill_signal" => spec.kill_signal = value.as_str().ok_or_else(|| bad(key, "a signal name"))?.into(),
            "instance_var" => spec.instance_var = value.as_str().ok_or_else(|| bad(key, "a variable name"))?.into(),
            "max_memory_restart" => {
                spec.max_memory_restart = Some(bytes(value).ok_or_else(|| bad(key, "a size such as 200M, 1G or 512K"))?)
            }
            "cron_restart" | "cron" => {
                let c = match value {
                    Value::String(c) => c.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return Err(bad(key, "a cron pattern such as \"0 3 * * *\"")),
                };
                crate::protocol::schedule::CronRestart::parse(&c)
                    .map_err(|e| invalid(file, format!("{label}: {}", e.message)))?;
                spec.cron_restart = Some(c);
            }
            "listen" => {
                spec.listen = words(value).ok_or_else(|| bad(key, "an address or a list of them (tcp://:3000)"))?;
                for l in &spec.listen {
                    crate::protocol::listen::ListenAddr::parse(l)
                        .map_err(|e| invalid(file, format!("{label}: {}", e.message)))?;
                }
            }
            "watch" => {
                spec.watch = serde_json::from_value(value.clone())
                    .map_err(|_| bad(key, "true, false, or a list of paths"))?
            }
            "ignore_watch" => {
                spec.ignore_watch = match value {
                    Value::String(s) => vec![s.clone()],
                    _ => serde_json::from_value(value.clone())
                        .map_err(|_| bad(key, "a glob or a list of globs"))?,
                }
            }
            "watch_delay" => spec.watch_delay = dur(value).ok_or_else(|| bad(key, "a duration (ms or \"1s\")"))?,
            "stop_exit_codes" => {
                spec.stop_exit_codes = serde_json::from_value::<ExitCodes>(value.clone())
                    .map_err(|_| bad(key, "an exit code or a list of them"))?
            }
            other => match IGNORED.iter().find(|(k, _)| *k == other) {
                Some((_, why)) => warnings.push(format!("{file}: {label}: option `{other}` ignored ({why})")),
                None => warnings.push(format!(
                    "{file}: {label}: unknown option `{other}` ignored: check its spelling against pm2's option names"
                )),
            },
        }
    }
    if let Some(p) = profile
        && let Some(v) = app.get(&format!("env_{p}"))
    {
        merge_env(&mut spec, v)
            .ok_or_else(|| bad(&format!("env_{p}"), "a table of NAME = value"))?;
    }
    Ok(spec)
}

/// pm2's `args`: a list, or a string split on white space (quotes group words).
fn words(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        Value::String(s) => Some(split_words(s)),
        _ => None,
    }
}

fn split_words(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `-i` on the command line, with pm2's rules (see [`instances`]).
pub fn parse_instances(s: &str, cpus: u32) -> Option<u32> {
    instances(&Value::String(s.to_string()), cpus)
}

/// `--max-memory-restart 200M`, with pm2's rules.
pub fn parse_bytes(s: &str) -> Option<u64> {
    bytes(&Value::String(s.to_string()))
}

/// pm2's instances: a number; 0 or "max" is the CPU count; -n is CPUs minus n; at least 1.
fn instances(v: &Value, cpus: u32) -> Option<u32> {
    let n: i64 = match v {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) if s == "max" => 0,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    let cpus = i64::from(cpus.max(1));
    let n = if n == 0 {
        cpus
    } else if n < 0 {
        cpus + n
    } else {
        n
    };
    u32::try_from(n.max(1)).ok()
}

fn flag(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        _ => None,
    }
}

fn dur(v: &Value) -> Option<std::time::Duration> {
    match v {
        Value::Number(n) => n.as_u64().map(std::time::Duration::from_millis),
        Value::String(s) => duration::parse(s).ok(),
        _ => None,
    }
}

/// `200M`, `1G`, `512K`, or bytes.
fn bytes(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            let (num, mult) = match s.chars().last()? {
                'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
                'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
                'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
                _ => (s, 1),
            };
            num.trim().parse::<u64>().ok()?.checked_mul(mult)
        }
        _ => None,
    }
}

fn merge_env(spec: &mut AppSpec, v: &Value) -> Option<()> {
    for (k, val) in v.as_object()? {
        let s = match val {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => String::new(),
            _ => return None,
        };
        spec.env.insert(k.clone(), s);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn toml_yaml_json_give_the_same_apps() {
        let d = tempfile::tempdir().unwrap();
        let toml = write(
            d.path(),
            "eco.toml",
            "[[apps]]\nname = \"api\"\nscript = \"server.js\"\ninstances = \"max\"\nmax_memory_restart = \"200M\"\nmin_uptime = \"2s\"\n[apps.env]\nNODE_ENV = \"development\"\nPORT = 3000\n[apps.env_production]\nNODE_ENV = \"production\"\n",
        );
        let yaml = write(
            d.path(),
            "eco.yaml",
            "apps:\n  - name: api\n    script: server.js\n    instances: max\n    max_memory_restart: 200M\n    min_uptime: 2s\n    env:\n      NODE_ENV: development\n      PORT: 3000\n    env_production:\n      NODE_ENV: production\n",
        );
        let json = write(
            d.path(),
            "eco.json",
            r#"{"apps":[{"name":"api","script":"server.js","instances":"max","max_memory_restart":"200M","min_uptime":2000,"env":{"NODE_ENV":"development","PORT":3000},"env_production":{"NODE_ENV":"production"}}]}"#,
        );
        let mut all = vec![];
        for f in [&toml, &yaml, &json] {
            let e = load(f, Some("production"), 4).unwrap();
            assert!(e.warnings.is_empty(), "{:?}", e.warnings);
            let a = e.apps.into_iter().next().unwrap();
            assert_eq!(a.instances, Some(4));
            assert_eq!(a.max_memory_restart, Some(200 << 20));
            assert_eq!(a.min_uptime, Duration::from_secs(2));
            assert_eq!(a.env["NODE_ENV"], "production");
            assert_eq!(a.env["PORT"], "3000");
            assert_eq!(
                a.script,
                std::fs::canonicalize(d.path()).unwrap().join("server.js")
            );
            all.push(serde_json::to_value(&a).unwrap());
        }
        assert_eq!(all[0], all[1]);
        assert_eq!(all[1], all[2]);
        // without the profile, `env` alone
        let e = load(&toml, None, 4).unwrap();
        assert_eq!(e.apps[0].env["NODE_ENV"], "development");
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let d = tempfile::tempdir().unwrap();
        for (name, text, line) in [
            ("a.toml", "[[apps]]\nname = \"api\"\nscript = \n", 3),
            ("a.yaml", "apps:\n  - name: api\n   script: [x\n", 3),
            ("a.json", "{\"apps\": [\n {\"name\": \"api\",}\n]}", 2),
        ] {
            let p = write(d.path(), name, text);
            match load(&p, None, 2).unwrap_err() {
                EcosystemError::Syntax { line: l, path, .. } => {
                    assert_eq!(l, line, "{name}");
                    assert!(path.ends_with(name));
                }
                other => panic!("{name}: {other}"),
            }
        }
    }

    #[test]
    fn unknown_and_unsupported_options_are_warned_about() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "e.json",
            r#"{"apps":[{"name":"api","script":"a.js","instanses":2,"watch":true,"autostart":false}]}"#,
        );
        let e = load(&p, Some("staging"), 2).unwrap();
        let w = e.warnings.join("\n");
        assert!(
            w.contains("unknown option `instanses`") && w.contains("app 'api'"),
            "{w}"
        );
        assert!(w.contains("`autostart` ignored (not supported yet)"), "{w}");
        assert!(!w.contains("`watch`"), "watch is supported: {w}");
        assert_eq!(e.apps[0].watch, crate::protocol::schedule::Watch::Cwd);
        assert!(w.contains("no app has `env_staging`"), "{w}");
    }

    #[test]
    fn bad_values_are_refused_with_the_app_and_key() {
        let d = tempfile::tempdir().unwrap();
        for (body, want) in [
            (r#"{"name":"my app","script":"a.js"}"#, "'my app'"),
            (r#"{"name":"api"}"#, "no `script`"),
            (
                r#"{"name":"api","script":"a.js","instances":"lots"}"#,
                "`instances` must be",
            ),
            (
                r#"{"name":"api","script":"a.js","autorestart":"maybe"}"#,
                "`autorestart` must be",
            ),
            (
                r#"{"name":"api","script":"a.js","max_memory_restart":"big"}"#,
                "`max_memory_restart`",
            ),
            (
                r#"{"name":"api","script":"a.js","namespace":"_x"}"#,
                "reserved",
            ),
        ] {
            let p = write(d.path(), "e.json", &format!(r#"{{"apps":[{body}]}}"#));
            let e = load(&p, None, 2).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
            assert!(e.contains("e.json"), "{e}");
        }
    }

    #[test]
    fn pm2_forms() {
        assert_eq!(instances(&serde_json::json!(-1), 4), Some(3));
        assert_eq!(instances(&serde_json::json!(0), 4), Some(4));
        assert_eq!(instances(&serde_json::json!(-9), 4), Some(1));
        assert_eq!(
            split_words("--port 3000 --name 'a b' \"\""),
            vec!["--port", "3000", "--name", "a b", ""]
        );
        assert_eq!(bytes(&serde_json::json!("1G")), Some(1 << 30));
        assert_eq!(bytes(&serde_json::json!(1024)), Some(1024));
    }

    #[test]
    fn the_example_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        crate::which::which("node", None)
            .expect("node is on PATH (ecosystem.config.js is run by it): scripts/test installs it (scripts/deps)");
        let names = [
            "ecosystem.toml",
            "ecosystem.yaml",
            "ecosystem.json",
            "ecosystem.config.js",
        ];
        let mut seen = vec![];
        for n in names {
            let e =
                load(&root.join(n), Some("production"), 2).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert!(e.warnings.is_empty(), "{n}: {:?}", e.warnings);
            seen.push(serde_json::to_value(&e.apps).unwrap());
        }
        for s in &seen[1..] {
            assert_eq!(s, &seen[0], "every example describes the same apps");
        }
    }
}
