//! Server settings: command line > `DRLLM_*` environment > TOML file > built-in defaults.
//! The binary turns flags and environment (clap reads both) into a [`Settings`]; this module
//! reads the file, layers them and checks the result. Every fixed default is a constant of
//! [`defaults`], which `drllm serve --help` shows and `systemd/drllm.toml` states (a test
//! checks the file against them).

use drllm_engine::DeviceChoice;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The built-in defaults: one constant per setting that has a fixed one. The others are
/// computed (threads from the cores, routers and model_alias from the model, db from the
/// environment) or have none (model, api_key, api_key_file; allowed_hosts and
/// allowed_origins are empty lists).
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr};

    pub const NO_ROUTERS: bool = false;
    pub const HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    pub const PORT: u16 = 8088;
    pub const CTX_SIZE: usize = 4096;
    pub const UBATCH_SIZE: usize = 512;
    pub const PARALLEL: usize = 1;
    pub const QUEUE: usize = 16;
    pub const BATCH: usize = 1;
    pub const NO_DB: bool = false;
    pub const DEFAULT_MAX_TOKENS: usize = 256;
    /// 8 MiB.
    pub const MAX_BODY_BYTES: usize = 8 << 20;
    pub const MAX_CONNECTIONS: usize = 512;
    pub const RELOAD_DEBOUNCE_MS: u64 = 300;
    pub const DEVICE: &str = "auto";
    pub const BODY_TIMEOUT_SECS: u64 = 30;
    pub const CACHE_MB: usize = 512;
    pub const CACHE_EXACT: bool = true;
    pub const POOLING: &str = "auto";
    pub const LOG_DAYS: u64 = 30;
}

/// A bad configuration.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    Toml { path: PathBuf, message: String },
    /// A setting is missing or out of range.
    Invalid { key: &'static str, message: String },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            ConfigError::Toml { path, message } => write!(f, "{}: {message}", path.display()),
            ConfigError::Invalid { key, message } => write!(f, "setting '{key}': {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every setting, each optional so that layers can be merged. Field names are the TOML keys,
/// the long flags (with `-`) and, upper-cased with a `DRLLM_` prefix, the environment variables.
/// Defaults named in `[...]` are the constants of [`defaults`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// GGUF model file (no default here; `drllm serve` gives one).
    pub model: Option<PathBuf>,
    /// Router sidecar (default: MODEL.routers.gguf next to the model).
    pub routers: Option<PathBuf>,
    /// Serve the plain model; do not load or watch a sidecar ([`defaults::NO_ROUTERS`]).
    pub no_routers: Option<bool>,
    /// Address to bind ([`defaults::HOST`]).
    pub host: Option<IpAddr>,
    /// Port ([`defaults::PORT`]; 0 picks a free one).
    pub port: Option<u16>,
    /// CPU threads per worker (default: the cores divided among the workers, at least 1).
    pub threads: Option<usize>,
    /// Context length per request, tokens ([`defaults::CTX_SIZE`]).
    pub ctx_size: Option<usize>,
    /// Most prompt tokens per prefill graph, llama.cpp's `n_ubatch`
    /// ([`defaults::UBATCH_SIZE`], at most ctx_size).
    pub ubatch_size: Option<usize>,
    /// Workers: requests run at once, each with its own KV cache ([`defaults::PARALLEL`]).
    pub parallel: Option<usize>,
    /// Requests that may wait for a worker; more get 503 ([`defaults::QUEUE`]).
    pub queue: Option<usize>,
    /// Requests each worker runs at once, decoding those on the same path in one graph
    /// ([`defaults::BATCH`]; 1: no batching; each takes a KV cache of ctx_size).
    pub batch: Option<usize>,
    /// SQLite routing log (default: [`default_db_path`]).
    pub db: Option<PathBuf>,
    /// Do not write the routing log ([`defaults::NO_DB`]).
    pub no_db: Option<bool>,
    /// Bearer token every /v1 and /metrics request must carry (default: none).
    pub api_key: Option<String>,
    /// Names of the model in the API: the first is its id in `/v1/models` and in every
    /// response, the others are listed beside it (default: the file name without .gguf). A
    /// TOML string or list of strings. With one model served, a request naming any model is
    /// answered by it.
    #[serde(default, deserialize_with = "one_or_many")]
    pub model_alias: Option<Vec<String>>,
    /// max_tokens when a request gives none ([`defaults::DEFAULT_MAX_TOKENS`]).
    pub default_max_tokens: Option<usize>,
    /// Largest request body, bytes ([`defaults::MAX_BODY_BYTES`]).
    pub max_body_bytes: Option<usize>,
    /// Open connections served at once; more wait to be accepted
    /// ([`defaults::MAX_CONNECTIONS`]).
    pub max_connections: Option<usize>,
    /// Quiet time before a changed sidecar is reloaded, milliseconds
    /// ([`defaults::RELOAD_DEBOUNCE_MS`]).
    pub reload_debounce_ms: Option<u64>,
    /// Engine device: auto or cpu ([`defaults::DEVICE`]).
    pub device: Option<String>,
    /// Host names (besides loopback names and addresses, and the bound address) that
    /// requests may name in their Host header; `*` allows any. Default: none.
    pub allowed_hosts: Option<Vec<String>>,
    /// Web origins (`http://localhost:3000`) whose pages may call the API from a browser
    /// (CORS); `*` allows any. Default: none.
    pub allowed_origins: Option<Vec<String>>,
    /// Seconds a client has to send a request body once its headers are in
    /// ([`defaults::BODY_TIMEOUT_SECS`]).
    pub body_timeout_secs: Option<u64>,
    /// Host memory for the conversation cache, MiB ([`defaults::CACHE_MB`]; 0 turns it off).
    pub cache_mb: Option<usize>,
    /// Restore a cached conversation only as far as keeps its answer bit-identical to the
    /// same request uncached (to a multiple of the prefill's chunk size within the previous
    /// turn's prompt) ([`defaults::CACHE_EXACT`]); false restores every shared token (faster
    /// first tokens, answers that may differ in the last bits).
    pub cache_exact: Option<bool>,
    /// How `/v1/embeddings` pools a prompt's token states: `auto` (the file's
    /// `pooling_type`; a file that declares none, as causal LMs do, gets `mean`), `mean`,
    /// `cls` or `last` (llama.cpp's `--pooling`) ([`defaults::POOLING`]).
    pub pooling: Option<String>,
    /// A Jinja chat template used instead of the model file's (llama-server's
    /// `--chat-template-file`), e.g. `templates/chatml-tools.jinja` for tool calls with a
    /// ChatML model whose own template has none. Default: the file's.
    pub chat_template_file: Option<PathBuf>,
    /// Days the routing log keeps its rows ([`defaults::LOG_DAYS`]; 0 keeps them forever).
    pub log_days: Option<u64>,
    /// File holding the bearer token (e.g. a systemd credential); instead of `api_key`.
    pub api_key_file: Option<PathBuf>,
}

/// [`Settings::KEYS`] and [`Settings::over`] from one list of the fields (the struct literal
/// makes the compiler check that it names every one).
macro_rules! every_key {
    ($($f:ident),* $(,)?) => {
        impl Settings {
            /// Every key, in declaration order.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($f)),*];

            /// `self` where set, else `lower`.
            pub fn over(self, lower: Settings) -> Settings {
                Settings { $($f: self.$f.or(lower.$f)),* }
            }
        }
    };
}

every_key!(
    model,
    routers,
    no_routers,
    host,
    port,
    threads,
    ctx_size,
    ubatch_size,
    parallel,
    queue,
    batch,
    db,
    no_db,
    api_key,
    model_alias,
    default_max_tokens,
    max_body_bytes,
    max_connections,
    reload_debounce_ms,
    device,
    allowed_hosts,
    allowed_origins,
    body_timeout_secs,
    cache_mb,
    cache_exact,
    pooling,
    chat_template_file,
    log_days,
    api_key_file,
);

/// A string or a list of strings (`model_alias = "a"` or `["a", "b"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

impl ServeConfig {
    /// The model's id in the API (the first of its names).
    pub fn model_id(&self) -> &str {
        self.model_alias.first().map_or("model", String::as_str)
    }
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

impl Settings {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Fills the defaults and checks ranges. The checks run in the order written here (the
    /// fields of the literal are evaluated in order): the first bad setting is reported.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let model = self.model.clone().ok_or_else(|| {
            invalid(
                "model",
                "no model given (--model, DRLLM_MODEL or model = \"...\" in the config file)"
                    .into(),
            )
        })?;
        let routers = if self.no_routers.unwrap_or(defaults::NO_ROUTERS) {
            None
        } else {
            Some(
                self.routers
                    .clone()
                    .unwrap_or_else(|| drllm_engine::router_format::sidecar_path_for(&model)),
            )
        };
        let parallel = in_range(
            "parallel",
            self.parallel.unwrap_or(defaults::PARALLEL),
            1,
            64,
        )?;
        Ok(ServeConfig {
            routers,
            host: self.host.unwrap_or(defaults::HOST),
            port: self.port.unwrap_or(defaults::PORT),
            threads: in_range(
                "threads",
                self.threads.unwrap_or_else(|| threads_per_worker(parallel)),
                1,
                1024,
            )?,
            ctx_size: in_range(
                "ctx_size",
                self.ctx_size.unwrap_or(defaults::CTX_SIZE),
                16,
                1 << 20,
            )?,
            ubatch_size: in_range(
                "ubatch_size",
                self.ubatch_size.unwrap_or(defaults::UBATCH_SIZE),
                1,
                1 << 16,
            )?,
            parallel,
            batch: in_range("batch", self.batch.unwrap_or(defaults::BATCH), 1, 64)?,
            queue: at_most("queue", self.queue.unwrap_or(defaults::QUEUE), 100_000)?,
            default_max_tokens: match self
                .default_max_tokens
                .unwrap_or(defaults::DEFAULT_MAX_TOKENS)
            {
                0 => return Err(invalid("default_max_tokens", "must be at least 1".into())),
                n => n,
            },
            max_body_bytes: in_range(
                "max_body_bytes",
                self.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES),
                1024,
                1 << 30,
            )?,
            max_connections: in_range(
                "max_connections",
                self.max_connections.unwrap_or(defaults::MAX_CONNECTIONS),
                1,
                1_000_000,
            )?,
            db: self.db()?,
            device: self.device()?,
            api_key: self.api_key()?,
            model_alias: self.model_aliases(&model)?,
            body_timeout: self.body_timeout()?,
            allowed_hosts: checked_names("allowed_hosts", &self.allowed_hosts)?,
            allowed_origins: checked_names("allowed_origins", &self.allowed_origins)?,
            cache_bytes: in_range(
                "cache_mb",
                self.cache_mb.unwrap_or(defaults::CACHE_MB),
                0,
                1 << 20,
            )? << 20,
            cache_exact: self.cache_exact.unwrap_or(defaults::CACHE_EXACT),
            pooling: self.pooling()?,
            chat_template: self.chat_template()?,
            log_keep: self.log_keep()?,
            reload_debounce: Duration::from_millis(
                self.reload_debounce_ms
                    .unwrap_or(defaults::RELOAD_DEBOUNCE_MS),
            ),
            model,
            fault: None,
        })
    }

    /// The routing log: `db`, else [`default_db_path`]; None with `no_db`.
    fn db(&self) -> Result<Option<PathBuf>, ConfigError> {
        if self.no_db.unwrap_or(defaults::NO_DB) {
            return Ok(None);
        }
        match &self.db {
            Some(p) => Ok(Some(p.clone())),
            None => Ok(Some(default_db_path().ok_or_else(|| {
                invalid(
                    "db",
                    "no default place for the routing log (neither XDG_STATE_HOME nor HOME \
                     is set): give --db PATH or --no-db"
                        .into(),
                )
            })?)),
        }
    }

    /// `chat_template_file`, read: (its path, its text).
    fn chat_template(&self) -> Result<Option<(PathBuf, String)>, ConfigError> {
        let Some(p) = &self.chat_template_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(p).map_err(|e| {
            invalid(
                "chat_template_file",
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        if text.trim().is_empty() {
            return Err(invalid(
                "chat_template_file",
                format!("{} is empty", p.display()),
            ));
        }
        Ok(Some((p.clone(), text)))
    }

    /// `pooling`: None for `auto` (the file decides at load), else the pooling asked for.
    fn pooling(&self) -> Result<Option<drllm_engine::Pooling>, ConfigError> {
        use drllm_engine::Pooling;
        match self.pooling.as_deref().unwrap_or(defaults::POOLING) {
            "auto" => Ok(None),
            "mean" => Ok(Some(Pooling::Mean)),
            "cls" => Ok(Some(Pooling::Cls)),
            "last" => Ok(Some(Pooling::Last)),
            other => Err(invalid(
                "pooling",
                format!("must be auto, mean, cls or last, got '{other}'"),
            )),
        }
    }

    fn device(&self) -> Result<DeviceChoice, ConfigError> {
        match self.device.as_deref().unwrap_or(defaults::DEVICE) {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            other => Err(invalid(
                "device",
                format!("must be auto or cpu, got '{other}'"),
            )),
        }
    }

    /// The bearer token: `api_key`, or the first line of `api_key_file` (not both).
    fn api_key(&self) -> Result<Option<String>, ConfigError> {
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "api_key_file",
                    "give api_key or api_key_file, not both".into(),
                ))
            }
            (Some(k), None) => Some(k.clone()),
            (None, Some(f)) => Some(read_key_file(f).map_err(|m| invalid("api_key_file", m))?),
            (None, None) => None,
        };
        if let Some(k) = &key {
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "api_key",
                    "must be non-empty, without spaces or control characters".into(),
                ));
            }
        }
        Ok(key)
    }

    /// `model_alias` (every name non-empty, none twice), else the model's file name without
    /// `.gguf`.
    fn model_aliases(&self, model: &Path) -> Result<Vec<String>, ConfigError> {
        match &self.model_alias {
            Some(v) if v.is_empty() => Err(invalid("model_alias", "names no model".into())),
            Some(v) => {
                if v.iter().any(|a| a.trim().is_empty()) {
                    return Err(invalid("model_alias", "a name is empty".into()));
                }
                if let Some(a) = v
                    .iter()
                    .enumerate()
                    .find_map(|(i, a)| v[..i].contains(a).then_some(a))
                {
                    return Err(invalid("model_alias", format!("'{a}' is given twice")));
                }
                Ok(v.clone())
            }
            None => Ok(vec![model
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .map(|n| match n.strip_suffix(".gguf") {
                    Some(s) => s.to_string(),
                    None => n,
                })
                .unwrap_or_else(|| "model".into())]),
        }
    }

    fn body_timeout(&self) -> Result<Duration, ConfigError> {
        let secs = self
            .body_timeout_secs
            .unwrap_or(defaults::BODY_TIMEOUT_SECS);
        if !(1..=3600).contains(&secs) {
            return Err(invalid(
                "body_timeout_secs",
                format!("must be 1..=3600, got {secs}"),
            ));
        }
        Ok(Duration::from_secs(secs))
    }

    /// How long the routing log keeps rows (None: forever, `log_days` = 0).
    fn log_keep(&self) -> Result<Option<Duration>, ConfigError> {
        let days = at_most(
            "log_days",
            self.log_days.unwrap_or(defaults::LOG_DAYS),
            36_500,
        )?;
        Ok((days > 0).then(|| Duration::from_secs(days * 86_400)))
    }
}

/// The default CPU threads of each of `parallel` workers: the cores divided among them.
fn threads_per_worker(parallel: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4);
    (cores / parallel).max(1)
}

/// The host names (`allowed_hosts`) or web origins (`allowed_origins`) of a list, checked.
fn checked_names(
    key: &'static str,
    list: &Option<Vec<String>>,
) -> Result<Vec<String>, ConfigError> {
    for v in list.iter().flatten() {
        let bad = v.trim().is_empty()
            || v.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',')
            || (key == "allowed_origins" && v != "*" && v != "null" && !v.contains("://"));
        if bad {
            return Err(invalid(
                key,
                format!(
                    "'{v}' is not a {} (or *)",
                    if key == "allowed_hosts" {
                        "host name"
                    } else {
                        "web origin such as http://localhost:3000"
                    }
                ),
            ));
        }
    }
    Ok(list.clone().unwrap_or_default())
}

/// The bearer token in a file (first line, surrounding whitespace dropped). The file must
/// not be readable by other users: a token anyone on the machine can read protects nothing.
fn read_key_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(format!(
                "{} is readable by every user (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    if meta.len() > 4096 {
        return Err(format!("{} is not a key (over 4 KiB)", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(format!("{} holds no key", path.display()));
    }
    Ok(key)
}

/// `value` if it is at most `max`, else the error naming `key`.
fn at_most<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    max: T,
) -> Result<T, ConfigError> {
    if value > max {
        return Err(invalid(key, format!("must be at most {max}, got {value}")));
    }
    Ok(value)
}

/// `value` if it lies in `lo..=hi`, else the error naming `key`.
fn in_range(key: &'static str, value: usize, lo: usize, hi: usize) -> Result<usize, ConfigError> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            key,
            message: format!("must be {lo}..={hi}, got {value}"),
        })
    }
}

/// `$XDG_STATE_HOME/drllm/routing.sqlite`, else `$HOME/.local/state/drllm/routing.sqlite`.
pub fn default_db_path() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = nonempty("XDG_STATE_HOME") {
        return Some(PathBuf::from(x).join("drllm/routing.sqlite"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".local/state/drllm/routing.sqlite"))
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// The sidecar watched and loaded; None with `no_routers`.
    pub routers: Option<PathBuf>,
    pub host: IpAddr,
    pub port: u16,
    pub threads: usize,
    pub ctx_size: usize,
    pub ubatch_size: usize,
    pub parallel: usize,
    pub queue: usize,
    pub batch: usize,
    pub db: Option<PathBuf>,
    pub api_key: Option<String>,
    /// The model's names in the API, at least one; the first is its id.
    pub model_alias: Vec<String>,
    pub default_max_tokens: usize,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub reload_debounce: Duration,
    pub device: DeviceChoice,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub body_timeout: Duration,
    /// Bytes the conversation cache may hold (0: off).
    pub cache_bytes: usize,
    pub cache_exact: bool,
    /// None: the file's pooling (mean when it declares none).
    pub pooling: Option<drllm_engine::Pooling>,
    /// The chat template used instead of the file's: its path and its Jinja text.
    pub chat_template: Option<(PathBuf, String)>,
    /// How long the routing log keeps rows (None: forever).
    pub log_keep: Option<Duration>,
    /// Called by the workers at each fault point (tests inject panics with it).
    #[doc(hidden)]
    pub fault: Option<crate::pool::FaultHook>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_defaults() {
        let file: Settings = toml::from_str(
            "model = \"/m/a.gguf\"\nport = 9000\nqueue = 4\nctx_size = 512\ndb = \"/tmp/x.sqlite\"",
        )
        .unwrap();
        let env = Settings {
            port: Some(9100),
            ctx_size: Some(1024),
            ..Default::default()
        };
        let flags = Settings {
            port: Some(9200),
            ..Default::default()
        };
        let c = flags.over(env.over(file)).resolve().unwrap();
        assert_eq!(c.port, 9200);
        assert_eq!(c.ctx_size, 1024);
        assert_eq!(c.queue, 4);
        assert_eq!(c.host, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.model_alias, ["a"]);
        assert_eq!(c.routers, Some(PathBuf::from("/m/a.routers.gguf")));
        assert_eq!(c.db, Some(PathBuf::from("/tmp/x.sqlite")));
        let c = Settings {
            model: Some("m.gguf".into()),
            no_routers: Some(true),
            no_db: Some(true),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!((c.routers, c.db), (None, None));
    }

    /// systemd/drllm.toml shows every key once, each a real setting of the right type, and
    /// every value it shows (commented out or not) is what the code does when the key is
    /// left out, unless the comment after it starts with "example".
    #[test]
    fn the_example_config_shows_every_key_with_the_codes_default() {
        let path = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("../systemd/drllm.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let file = Settings::from_file(&path).unwrap(); // as the daemon reads it
                                                        // the routing log's default place comes from the environment: fixed here
        let base = Settings {
            model: Some(file.model.clone().expect("the example names a model")),
            db: Some("/var/lib/drllm/routing.sqlite".into()),
            ..Default::default()
        };
        let resolved = |s: Settings| format!("{:?}", s.over(base.clone()).resolve().unwrap());
        let unset = resolved(Settings::default());
        let mut shown = Vec::new();
        for line in text.lines() {
            let code = line.strip_prefix('#').unwrap_or(line).trim_start();
            let Some((key, _)) = code.split_once(" = ") else {
                continue;
            };
            if !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                continue; // prose
            }
            let one: Settings = toml::from_str(code).unwrap_or_else(|e| panic!("{line}: {e}"));
            shown.push(key);
            let note = code.split_once(" # ").map_or("", |(_, n)| n.trim_start());
            if key == "model" || note.starts_with("example") {
                continue;
            }
            assert_eq!(resolved(one), unset, "{line}: not the default");
        }
        shown.sort_unstable();
        let mut keys = Settings::KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(
            shown, keys,
            "the keys drllm.toml shows (once each) and the settings"
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_api_key_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "s3cret-key \n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |s: Settings| {
            Settings {
                model: Some("/m/a.gguf".into()),
                no_db: Some(true),
                ..s
            }
            .resolve()
        };
        let c = with(Settings {
            api_key_file: Some(f.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.api_key.as_deref(), Some("s3cret-key"));
        // both: refused
        let e = with(Settings {
            api_key_file: Some(f.clone()),
            api_key: Some("x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        // readable by every user: refused
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = with(Settings {
            api_key_file: Some(f.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        // empty or missing
        std::fs::write(&f, "\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = with(Settings {
            api_key_file: Some(f.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("holds no key"), "{e}");
        let e = with(Settings {
            api_key_file: Some(dir.path().join("none")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("api_key_file"), "{e}");
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(matches!(
            Settings::default().resolve(),
            Err(ConfigError::Invalid { key: "model", .. })
        ));
        let base = Settings {
            model: Some("m.gguf".into()),
            no_db: Some(true),
            ..Default::default()
        };
        for (s, key) in [
            (
                Settings {
                    parallel: Some(0),
                    ..Default::default()
                },
                "parallel",
            ),
            (
                Settings {
                    ctx_size: Some(1),
                    ..Default::default()
                },
                "ctx_size",
            ),
            (
                Settings {
                    api_key: Some("a b".into()),
                    ..Default::default()
                },
                "api_key",
            ),
            (
                Settings {
                    device: Some("tpu".into()),
                    ..Default::default()
                },
                "device",
            ),
            (
                Settings {
                    allowed_origins: Some(vec!["localhost:3000".into()]),
                    ..Default::default()
                },
                "allowed_origins",
            ),
            (
                Settings {
                    allowed_hosts: Some(vec!["a b".into()]),
                    ..Default::default()
                },
                "allowed_hosts",
            ),
            (
                Settings {
                    body_timeout_secs: Some(0),
                    ..Default::default()
                },
                "body_timeout_secs",
            ),
        ] {
            match s.over(base.clone()).resolve() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(toml::from_str::<Settings>("prot = 1").is_err());
        assert!(toml::from_str::<Settings>("port = \"x\"").is_err());
    }
}
