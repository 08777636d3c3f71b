//! `drllm serve` (the daemon) and `drllm stats` (the routing log read back).

use anyhow::{bail, Context, Result};
use clap::Args;
use drllm_server::config::{default_db_path, defaults, Settings};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

/// A flag's help with the built-in default it falls back to (`Port [default: 8088]`): the
/// flags stay unset when not given, so that the environment and the file can fill them, and
/// the defaults shown are the constants the server applies.
fn with_default(text: &str, default: impl std::fmt::Display) -> String {
    format!("{text} [default: {default}]")
}

/// Settings of `drllm serve`. Each flag can also come from the `DRLLM_*` variable named in
/// its help and from the TOML file given by --config (same key names, with `_`); flags win
/// over the environment, which wins over the file, which wins over the defaults
/// ([`defaults`]; the model's is [`crate::DEFAULT_MODEL`]).
#[derive(Args)]
pub struct ServeArgs {
    /// TOML settings file.
    #[arg(long, env = "DRLLM_CONFIG")]
    config: Option<PathBuf>,
    #[arg(short = 'm', long, env = "DRLLM_MODEL",
          help = with_default("GGUF model file", crate::DEFAULT_MODEL))]
    model: Option<PathBuf>,
    /// Router sidecar, watched and hot-reloaded [default: MODEL.routers.gguf].
    #[arg(long, env = "DRLLM_ROUTERS")]
    routers: Option<PathBuf>,
    /// Serve the plain model; do not load or watch a sidecar.
    #[arg(long, env = "DRLLM_NO_ROUTERS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    no_routers: Option<bool>,
    #[arg(long, env = "DRLLM_HOST", help = with_default("Address to bind", defaults::HOST))]
    host: Option<IpAddr>,
    #[arg(long, env = "DRLLM_PORT",
          help = with_default("Port (0 picks a free one)", defaults::PORT))]
    port: Option<u16>,
    /// CPU threads per worker [default: the cores / --parallel, at least 1].
    #[arg(short = 't', long, env = "DRLLM_THREADS")]
    threads: Option<usize>,
    #[arg(short = 'c', long, env = "DRLLM_CTX_SIZE",
          help = with_default("Context length per request, tokens", defaults::CTX_SIZE))]
    ctx_size: Option<usize>,
    #[arg(long, env = "DRLLM_UBATCH_SIZE", value_name = "TOKENS", help = with_default(
        "Most prompt tokens per prefill graph (llama.cpp's -ub)",
        defaults::UBATCH_SIZE,
    ))]
    ubatch_size: Option<usize>,
    #[arg(long, env = "DRLLM_PARALLEL", help = with_default(
        "Workers: requests run at once (times --batch), each with its own KV cache",
        defaults::PARALLEL,
    ))]
    parallel: Option<usize>,
    #[arg(long, env = "DRLLM_QUEUE", help = with_default(
        "Requests that may wait for a worker; more get 503",
        defaults::QUEUE,
    ))]
    queue: Option<usize>,
    #[arg(long, env = "DRLLM_BATCH", help = with_default(
        "Requests each worker runs at once, those on the same path decoded in one graph; each \
         takes a KV cache of --ctx-size (1: no batching)",
        defaults::BATCH,
    ))]
    batch: Option<usize>,
    /// SQLite routing log [default: $XDG_STATE_HOME/drllm/routing.sqlite, else
    /// $HOME/.local/state/drllm/routing.sqlite].
    #[arg(long, env = "DRLLM_DB")]
    db: Option<PathBuf>,
    /// Do not write the routing log.
    #[arg(long, env = "DRLLM_NO_DB", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    no_db: Option<bool>,
    /// Bearer token required on /v1/* and /metrics (prefer the environment or the file: flags
    /// show in `ps`).
    #[arg(long, env = "DRLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A name of the model in the API (repeatable, or comma-separated): the first is its id in
    /// /v1/models and in responses, the others are listed beside it; a request naming any
    /// model is answered by the one served [default: the file name without .gguf].
    #[arg(
        long,
        env = "DRLLM_MODEL_ALIAS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    model_alias: Option<Vec<String>>,
    #[arg(long, env = "DRLLM_DEFAULT_MAX_TOKENS", help = with_default(
        "max_tokens of requests that give none (at most --ctx-size)",
        defaults::DEFAULT_MAX_TOKENS,
    ))]
    default_max_tokens: Option<usize>,
    #[arg(long, env = "DRLLM_MAX_BODY_BYTES", help = with_default(
        "Largest request body in bytes",
        defaults::MAX_BODY_BYTES,
    ))]
    max_body_bytes: Option<usize>,
    #[arg(long, env = "DRLLM_MAX_CONNECTIONS", help = with_default(
        "Open connections served at once; more wait to be accepted",
        defaults::MAX_CONNECTIONS,
    ))]
    max_connections: Option<usize>,
    #[arg(long, env = "DRLLM_RELOAD_DEBOUNCE_MS", help = with_default(
        "Quiet time before a changed sidecar is reloaded, ms",
        defaults::RELOAD_DEBOUNCE_MS,
    ))]
    reload_debounce_ms: Option<u64>,
    #[arg(long, env = "DRLLM_DEVICE",
          help = with_default("Engine device: auto or cpu", defaults::DEVICE))]
    device: Option<String>,
    /// Host names requests may use besides localhost, loopback addresses and the bound
    /// address (comma-separated; * allows any) [default: none].
    #[arg(
        long,
        env = "DRLLM_ALLOWED_HOSTS",
        value_delimiter = ',',
        value_name = "HOSTS"
    )]
    allowed_hosts: Option<Vec<String>>,
    /// Web origins whose pages may call the API from a browser, with CORS (comma-separated,
    /// e.g. http://localhost:3000; * allows any) [default: none].
    #[arg(
        long,
        env = "DRLLM_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGINS"
    )]
    allowed_origins: Option<Vec<String>>,
    #[arg(long, env = "DRLLM_BODY_TIMEOUT_SECS", value_name = "SECS", help = with_default(
        "Seconds a client has to send its request body",
        defaults::BODY_TIMEOUT_SECS,
    ))]
    body_timeout_secs: Option<u64>,
    #[arg(long, env = "DRLLM_CACHE_MB", value_name = "MIB", help = with_default(
        "Host memory for the conversation cache (the KV cache of finished requests, so that a \
         conversation's next turn prefills only what is new), MiB; 0 turns it off",
        defaults::CACHE_MB,
    ))]
    cache_mb: Option<usize>,
    #[arg(long, env = "DRLLM_CACHE_EXACT", value_name = "BOOL", help = with_default(
        "Restore a cached conversation only as far as keeps its answer bit-identical to the \
         same request uncached (false: restore every shared token; faster first tokens, answers \
         that may differ in the last bits)",
        defaults::CACHE_EXACT,
    ))]
    cache_exact: Option<bool>,
    #[arg(long, env = "DRLLM_POOLING", value_name = "POOLING", help = with_default(
        "How /v1/embeddings pools a prompt: auto (the file's pooling_type; mean for a file \
         that declares none, as causal LMs do), mean, cls or last (llama.cpp's --pooling)",
        defaults::POOLING,
    ))]
    pooling: Option<String>,
    /// A Jinja chat template to use instead of the model file's (llama-server's
    /// --chat-template-file), e.g. templates/chatml-tools.jinja for tool calls with a ChatML
    /// model whose own template has none (SmolLM2)
    #[arg(long, env = "DRLLM_CHAT_TEMPLATE_FILE", value_name = "PATH")]
    chat_template_file: Option<PathBuf>,
    #[arg(long, env = "DRLLM_LOG_DAYS", value_name = "DAYS", help = with_default(
        "Days the routing log keeps its rows; older ones are deleted at start and hourly \
         (0 keeps them forever)",
        defaults::LOG_DAYS,
    ))]
    log_days: Option<u64>,
    /// File holding the bearer token (first line), e.g. a systemd credential; it must not be
    /// readable by other users.
    #[arg(long, env = "DRLLM_API_KEY_FILE", value_name = "PATH")]
    api_key_file: Option<PathBuf>,
}

impl ServeArgs {
    fn settings(&self) -> Settings {
        Settings {
            model: self.model.clone(),
            routers: self.routers.clone(),
            no_routers: self.no_routers,
            host: self.host,
            port: self.port,
            threads: self.threads,
            ctx_size: self.ctx_size,
            ubatch_size: self.ubatch_size,
            parallel: self.parallel,
            queue: self.queue,
            batch: self.batch,
            db: self.db.clone(),
            no_db: self.no_db,
            api_key: self.api_key.clone(),
            model_alias: self.model_alias.clone(),
            default_max_tokens: self.default_max_tokens,
            max_body_bytes: self.max_body_bytes,
            max_connections: self.max_connections,
            reload_debounce_ms: self.reload_debounce_ms,
            device: self.device.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            allowed_origins: self.allowed_origins.clone(),
            body_timeout_secs: self.body_timeout_secs,
            cache_mb: self.cache_mb,
            cache_exact: self.cache_exact,
            pooling: self.pooling.clone(),
            chat_template_file: self.chat_template_file.clone(),
            log_days: self.log_days,
            api_key_file: self.api_key_file.clone(),
        }
    }
}

pub fn run_serve(a: ServeArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => Settings::from_file(p)?,
        None => Settings::default(),
    };
    let defaults = Settings {
        model: Some(PathBuf::from(crate::DEFAULT_MODEL)),
        ..Default::default()
    };
    let config = a.settings().over(file).over(defaults).resolve()?;
    if !config.model.exists() {
        bail!(
            "model file {} not found (run scripts/setup.sh to fetch the default models, or give --model)",
            config.model.display()
        );
    }
    drllm_server::run(config)?;
    Ok(())
}

/// `drllm stats`: what the routers did, per block, over a time window of the routing log.
#[derive(Args)]
pub struct StatsArgs {
    /// The routing log [default: as `serve`'s --db].
    #[arg(long, env = "DRLLM_DB")]
    db: Option<PathBuf>,
    /// Start of the window: a duration back from now (30m, 24h, 7d), a Unix time, or `all`.
    #[arg(long, default_value = "24h")]
    since: String,
    /// End of the window, same forms [default: now].
    #[arg(long)]
    until: Option<String>,
    /// Also draw the decisions per block as a PNG heatmap.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses `30m` / `24h` / `7d` / `90s` (back from `now`), a Unix time, or `all`.
pub fn parse_time(s: &str, now: f64) -> Result<f64> {
    let s = s.trim();
    if s == "all" {
        return Ok(0.0);
    }
    if s == "now" {
        return Ok(now);
    }
    let units = [
        ('s', 1.0),
        ('m', 60.0),
        ('h', 3600.0),
        ('d', 86400.0),
        ('w', 604800.0),
    ];
    if let Some((u, mult)) = units.iter().find(|(u, _)| s.ends_with(*u)) {
        let n: f64 = s[..s.len() - u.len_utf8()]
            .parse()
            .with_context(|| format!("'{s}' is not a duration like 30m, 24h or 7d"))?;
        if !(n.is_finite() && n >= 0.0) {
            bail!("'{s}': a duration must be >= 0");
        }
        return Ok(now - n * mult);
    }
    let t: f64 = s.parse().with_context(|| {
        format!("'{s}' is neither a duration (30m, 24h, 7d), a Unix time nor 'all'")
    })?;
    if !(t.is_finite() && t >= 0.0) {
        bail!("'{s}': a Unix time must be >= 0");
    }
    Ok(t)
}

pub fn run_stats(a: StatsArgs) -> Result<()> {
    let db = match a.db.clone().or_else(default_db_path) {
        Some(p) => p,
        None => bail!("no routing log given (--db PATH) and no default (HOME is not set)"),
    };
    let now = drllm_server::clock::unix_now();
    let since = parse_time(&a.since, now)?;
    let until = match &a.until {
        Some(u) => parse_time(u, now)?,
        None => now + 1.0,
    };
    if until <= since {
        bail!("--until must be later than --since");
    }
    // every routed row: above MAX_HEATMAP_QUESTIONS the heatmap draws per-block shares
    let s = drllm_server::db::summarise(&db, since, until, 1_000_000)?;
    let mut out = String::new();
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&s)?);
    } else {
        let _ = writeln!(out,
            "{} requests ({} routed) in {}; mean block passes {:.2} of {}; {} prompt and {} generated tokens; {:.1} tokens/s",
            s.requests,
            s.routed,
            db.display(),
            s.mean_passes,
            s.n_layer,
            s.prompt_tokens,
            s.completion_tokens,
            s.tokens_per_second
        );
        for (g, n) in &s.generations {
            let _ = writeln!(
                out,
                "  router generation {}: {n} requests",
                drllm_server::reload::short(g)
            );
        }
        if s.routed > 0 {
            let _ = writeln!(
                out,
                "\n| block | skip | execute | repeat | skip % | repeat % |"
            );
            let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
            for (b, c) in s.blocks.iter().enumerate() {
                let n = (c[0] + c[1] + c[2]).max(1) as f64;
                let _ = writeln!(
                    out,
                    "| {b} | {} | {} | {} | {:.1} | {:.1} |",
                    c[0],
                    c[1],
                    c[2],
                    100.0 * c[0] as f64 / n,
                    100.0 * c[2] as f64 / n
                );
            }
        }
    }
    // a closed pipe (`drllm stats | head`) is not an error
    {
        use std::io::Write as _;
        let mut so = std::io::stdout().lock();
        if let Err(e) = so.write_all(out.as_bytes()).and_then(|()| so.flush()) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e.into());
            }
        }
    }
    if let Some(png) = &a.png {
        if s.decisions.is_empty() {
            bail!("no routed requests in the window: nothing to plot");
        }
        drllm_plots::decision_heatmap_of(png, "routing decisions", &s.decisions, "request")?;
        eprintln!("[drllm] wrote {}", png.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times() {
        let now = 1_000_000.0;
        assert_eq!(parse_time("all", now).unwrap(), 0.0);
        assert_eq!(parse_time("30m", now).unwrap(), now - 1800.0);
        assert_eq!(parse_time("24h", now).unwrap(), now - 86400.0);
        assert_eq!(parse_time("7d", now).unwrap(), now - 7.0 * 86400.0);
        assert_eq!(parse_time("1.5s", now).unwrap(), now - 1.5);
        assert_eq!(parse_time("12345", now).unwrap(), 12345.0);
        for bad in ["", "h", "-1h", "yesterday", "nan", "1e400d"] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }
}
