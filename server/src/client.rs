//! A minimal blocking HTTP/1.1 client (standard library only) for talking to a drllm server:
//! one request per connection (`Connection: close`), chunked bodies decoded. Used by
//! `drllm loadtest` and the tests; applications would use a full HTTP or OpenAI client.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: String,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(&self.body)
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<&str> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .collect()
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Decodes a chunked body.
pub fn dechunk(mut raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk size"))?;
        let size = std::str::from_utf8(&raw[..nl]).map_err(|_| bad("bad chunk size"))?;
        let size = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
        if n == 0 {
            return Ok(out);
        }
        let start = nl + 2;
        let end = start
            .checked_add(n)
            .filter(|&e| e.checked_add(2).is_some_and(|x| x <= raw.len()))
            .ok_or_else(|| bad("truncated chunk"))?;
        out.extend_from_slice(&raw[start..end]);
        raw = &raw[end + 2..];
    }
}

/// Parses a whole response (status line, headers, body).
pub fn parse_response(buf: &[u8]) -> std::io::Result<Response> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw = &buf[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends one request and reads the whole response. `body` is sent as JSON.
pub fn request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    request_with(addr, method, path, &[], body, token, timeout)
}

/// [`request`] that also times the first generated text of a streamed answer: the time from
/// sending until the body holds an event with non-empty `"content"` (or `"text"`), i.e. the
/// time to first token as a client sees it. None if no such event came.
pub fn request_first_text(
    addr: impl ToSocketAddrs,
    path: &str,
    body: &str,
    token: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(Response, Option<Duration>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nConnection: close\r\nHost: {}\r\n",
        s.peer_addr()?
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let t0 = std::time::Instant::now();
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let mut first = None;
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if first.is_none() && has_text(&buf) {
            first = Some(t0.elapsed());
        }
    }
    Ok((parse_response(&buf)?, first))
}

/// Whether raw response bytes hold a streamed event with generated text.
fn has_text(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    ["\"content\":\"", "\"text\":\""].iter().any(|key| {
        text.match_indices(key).any(|(i, _)| {
            text[i + key.len()..]
                .chars()
                .next()
                .is_some_and(|c| c != '"')
        })
    })
}

/// [`request`] with extra headers; a `Host` among them replaces the default (the address
/// connected to, as a browser or curl would send it).
pub fn request_with(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    token: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {}\r\n", s.peer_addr()?));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b.as_bytes())?;
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse_response(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}")
            .unwrap();
        assert_eq!(
            (r.status, r.body.as_str(), r.header("x-a")),
            (404, "{}", Some("b"))
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n3;x=y\r\n1\n\n\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "data: 1\n\n");
        assert_eq!(r.sse_data(), vec!["1"]);
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nshort\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffed\r\nx\r\n",
        ] {
            assert!(parse_response(bad).is_err());
        }
    }
}
