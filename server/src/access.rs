//! Who may talk to the daemon. A local daemon is for local programs, not for the web pages
//! the user happens to visit:
//!
//! - **Host**: a request must name the server by a loopback name or address (`localhost`,
//!   `*.localhost`, `127.0.0.0/8`, `::1`), by the address it is bound to, or by an entry of
//!   `--allowed-hosts`. A page that rebinds its own domain name to 127.0.0.1 (DNS rebinding)
//!   still sends its domain as Host, and is refused.
//! - **Origin**: a browser names the page that sends a request in `Origin` (and, since 2023
//!   in every major browser, whether it is another site in `Sec-Fetch-Site`). A request from
//!   another origin is refused unless that origin is in `--allowed-origins`; an allowed
//!   origin gets CORS headers, preflights included. Programs (curl, SDKs) send neither header
//!   and are unaffected.

use crate::api::ApiError;
use hyper::header::{HeaderMap, HeaderValue};
use std::net::IpAddr;

/// The Host and Origin policy of a server.
#[derive(Debug, Clone)]
pub struct Access {
    /// Extra host names (lower case, no port); `*` allows any.
    hosts: Vec<String>,
    /// Allowed origins (`scheme://host[:port]`, lower case); `*` allows any.
    origins: Vec<String>,
    /// The address the server is bound to.
    bound: IpAddr,
}

/// What a request may do, when it is not refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// No browser origin involved (or the server's own): answer as usual.
    Plain,
    /// A browser request from an allowed other origin: answer with CORS headers for it.
    Cors(String),
}

impl Access {
    /// The policy for a server bound to `bound`, with the extra `hosts` and `origins`.
    pub fn new(bound: IpAddr, hosts: &[String], origins: &[String]) -> Access {
        let norm = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Access {
            hosts: norm(hosts)
                .into_iter()
                .map(|h| split_host(&h).0.to_string())
                .collect(),
            origins: norm(origins),
            bound,
        }
    }

    /// Whether a request naming `host` (a Host header value: name or address, maybe a port)
    /// is for this server.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let (name, _port) = split_host(&host);
        let name = name.strip_suffix('.').unwrap_or(name);
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            if ip.is_loopback() || (!self.bound.is_unspecified() && ip == self.bound) {
                return true;
            }
        }
        self.hosts.iter().any(|h| h == "*" || h == name)
    }

    /// Whether a page at `origin` may use the server from a browser.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        self.origins.iter().any(|o| o == "*" || *o == origin)
    }

    /// Checks a request's Host, Origin and Sec-Fetch-Site headers.
    pub fn check(&self, headers: &HeaderMap) -> Result<Allowed, ApiError> {
        let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
        // HTTP/1.0 clients may omit Host; browsers never do
        let host = text("host");
        if let Some(h) = host {
            if !self.host_allowed(h) {
                return Err(forbidden(
                    format!(
                        "requests for host '{h}' are not served: use a loopback address or \
                         localhost, or start drllm serve with --allowed-hosts {}",
                        split_host(h).0
                    ),
                    "host_not_allowed",
                ));
            }
        }
        match text("origin") {
            Some(origin) => {
                // the server's own origin (a page it served, or the address bar)
                let own = host.is_some_and(|h| {
                    origin.eq_ignore_ascii_case(&format!("http://{h}"))
                        || origin.eq_ignore_ascii_case(&format!("https://{h}"))
                });
                if own {
                    Ok(Allowed::Plain)
                } else if self.origin_allowed(origin) {
                    Ok(Allowed::Cors(origin.to_string()))
                } else {
                    Err(forbidden(
                        format!(
                            "requests from the web page at '{origin}' are not allowed: a local \
                             daemon answers local programs; to let that page use it, start drllm \
                             serve with --allowed-origins {origin}"
                        ),
                        "origin_not_allowed",
                    ))
                }
            }
            None => match text("sec-fetch-site") {
                // a browser request from another site that carries no Origin (e.g. a
                // no-cors GET from an <img> or <script> tag)
                Some(s)
                    if s.eq_ignore_ascii_case("cross-site")
                        || s.eq_ignore_ascii_case("same-site") =>
                {
                    Err(forbidden(
                        "requests from other web sites are not allowed".into(),
                        "origin_not_allowed",
                    ))
                }
                _ => Ok(Allowed::Plain),
            },
        }
    }
}

fn forbidden(message: String, code: &'static str) -> ApiError {
    ApiError {
        status: 403,
        message,
        kind: "permission_error",
        param: None,
        code: Some(code),
    }
}

/// Splits `name[:port]` or `[v6]:port` into the name (without brackets) and the port text.
fn split_host(h: &str) -> (&str, Option<&str>) {
    if let Some(rest) = h.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':')),
            None => (h, None),
        };
    }
    match h.rsplit_once(':') {
        // one colon only: a name or IPv4 address with a port (a bare IPv6 address has more)
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (h, None),
    }
}

/// CORS headers for an allowed origin on an ordinary response.
pub fn cors_headers(headers: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert("access-control-allow-origin", v);
    }
    headers.append("vary", HeaderValue::from_static("Origin"));
    headers.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("Retry-After"),
    );
}

/// The headers answering a preflight (`OPTIONS` with `Access-Control-Request-Method`) from an
/// allowed origin: the methods of the route, and the request headers it asked for.
pub fn preflight_headers(
    headers: &mut HeaderMap,
    origin: &str,
    request: &HeaderMap,
    methods: &str,
) {
    cors_headers(headers, origin);
    if let Ok(v) = HeaderValue::from_str(methods) {
        headers.insert("access-control-allow-methods", v);
    }
    let asked = request
        .get("access-control-request-headers")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            s.split(',').all(|h| {
                let h = h.trim();
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
        })
        .unwrap_or("authorization, content-type");
    if let Ok(v) = HeaderValue::from_str(asked) {
        headers.insert("access-control-allow-headers", v);
    }
    headers.insert("access-control-max-age", HeaderValue::from_static("600"));
    // Chrome's Private Network Access: a public page asking for a loopback server
    if request
        .get("access-control-request-private-network")
        .is_some_and(|v| v == "true")
    {
        headers.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn loopback_names_and_addresses_are_the_only_default_hosts() {
        let a = Access::new(IpAddr::from([127, 0, 0, 1]), &[], &[]);
        for ok in [
            "127.0.0.1:8088",
            "127.0.0.1",
            "127.1.2.3:80",
            "localhost:8088",
            "LOCALHOST",
            "localhost.",
            "app.localhost:3000",
            "[::1]:8088",
            "[::ffff:127.0.0.1]:8088",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:8088",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "192.168.1.5:8088",
            "[2001:db8::1]:8088",
            "",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn the_bound_address_and_allowed_hosts_are_served() {
        let a = Access::new(
            IpAddr::from([192, 168, 1, 5]),
            &["My-Box.lan:8088".into()],
            &[],
        );
        assert!(a.host_allowed("192.168.1.5:8088"));
        assert!(a.host_allowed("my-box.lan:8088"));
        assert!(a.host_allowed("my-box.lan"));
        assert!(!a.host_allowed("192.168.1.6:8088"));
        assert!(!a.host_allowed("other.lan"));
        // bound to every address: only names and loopback, unless allowed
        let any = Access::new(IpAddr::from([0, 0, 0, 0]), &[], &[]);
        assert!(!any.host_allowed("0.0.0.0:8088"));
        assert!(!any.host_allowed("10.0.0.2:8088"));
        let star = Access::new(IpAddr::from([0, 0, 0, 0]), &["*".into()], &[]);
        assert!(star.host_allowed("anything.example"));
    }

    #[test]
    fn browser_requests_from_other_origins_are_refused_unless_allowed() {
        let a = Access::new(
            IpAddr::from([127, 0, 0, 1]),
            &[],
            &["http://localhost:3000/".into()],
        );
        let host = ("host", "127.0.0.1:8088");
        assert_eq!(a.check(&headers(&[host])).unwrap(), Allowed::Plain);
        assert_eq!(
            a.check(&headers(&[host, ("origin", "http://127.0.0.1:8088")]))
                .unwrap(),
            Allowed::Plain
        );
        assert_eq!(
            a.check(&headers(&[host, ("origin", "http://localhost:3000")]))
                .unwrap(),
            Allowed::Cors("http://localhost:3000".into())
        );
        for origin in [
            "https://attacker.example",
            "null",
            "http://localhost:3001",
            "http://localhost:3000.attacker.example",
        ] {
            let e = a.check(&headers(&[host, ("origin", origin)])).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (403, Some("origin_not_allowed")),
                "{origin}"
            );
        }
        let e = a
            .check(&headers(&[host, ("sec-fetch-site", "cross-site")]))
            .unwrap_err();
        assert_eq!(e.status, 403);
        assert_eq!(
            a.check(&headers(&[host, ("sec-fetch-site", "none")]))
                .unwrap(),
            Allowed::Plain
        );
        let e = a
            .check(&headers(&[("host", "attacker.example:8088")]))
            .unwrap_err();
        assert_eq!((e.status, e.code), (403, Some("host_not_allowed")));
        assert!(
            e.message.contains("--allowed-hosts attacker.example"),
            "{e}"
        );
        // no Host at all (HTTP/1.0 programs)
        assert_eq!(a.check(&HeaderMap::new()).unwrap(), Allowed::Plain);
        let any = Access::new(IpAddr::from([127, 0, 0, 1]), &[], &["*".into()]);
        assert_eq!(
            any.check(&headers(&[host, ("origin", "https://x.example")]))
                .unwrap(),
            Allowed::Cors("https://x.example".into())
        );
    }

    #[test]
    fn preflight_echoes_the_asked_headers_only_when_they_are_header_names() {
        let mut out = HeaderMap::new();
        let req = headers(&[
            (
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            ),
            ("access-control-request-private-network", "true"),
        ]);
        preflight_headers(&mut out, "http://localhost:3000", &req, "POST, OPTIONS");
        assert_eq!(out["access-control-allow-origin"], "http://localhost:3000");
        assert_eq!(
            out["access-control-allow-headers"],
            "authorization, content-type, x-stainless-os"
        );
        assert_eq!(out["access-control-allow-methods"], "POST, OPTIONS");
        assert_eq!(out["access-control-allow-private-network"], "true");
        let mut out = HeaderMap::new();
        let req = headers(&[("access-control-request-headers", "a b;c")]);
        preflight_headers(&mut out, "http://x", &req, "GET, OPTIONS");
        assert_eq!(
            out["access-control-allow-headers"],
            "authorization, content-type"
        );
    }
}
