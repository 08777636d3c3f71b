//! A Rust client for `drllm serve`, with nothing but the standard library and serde_json:
//! one chat completion, then the same question streamed, printing the routing information.
//!
//!     cargo run --release --example client -- [HOST:PORT] [PROMPT]
//!
//! (default 127.0.0.1:8088; set DRLLM_API_KEY if the server wants a token). A real application
//! would use an HTTP client crate (reqwest, ureq) or an OpenAI client; the wire format is
//! what matters.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

fn post(addr: &str, path: &str, body: &Value) -> std::io::Result<BufReader<TcpStream>> {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr)?;
    let auth = std::env::var("DRLLM_API_KEY")
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(BufReader::new(s))
}

/// Reads the status line and headers; returns the status and whether the body is chunked.
fn head(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        let l = line.to_ascii_lowercase();
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
    }
    Ok((status, chunked))
}

/// The body, de-chunked when needed, handed out line by line (SSE) or whole.
fn body_lines(
    mut r: BufReader<TcpStream>,
    chunked: bool,
    mut on_line: impl FnMut(&str),
) -> std::io::Result<()> {
    if !chunked {
        let mut s = String::new();
        r.read_to_string(&mut s)?;
        s.lines().for_each(&mut on_line);
        return Ok(());
    }
    let mut pending = String::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk)?;
        pending.push_str(&String::from_utf8_lossy(&chunk[..n]));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            on_line(line.trim_end());
        }
    }
    if !pending.is_empty() {
        on_line(pending.trim_end());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8088".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "Explain in one sentence why the sky is blue.".into());
    let request = json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "temperature": 0,
    });

    let mut r = post(&addr, "/v1/chat/completions", &request)?;
    let (status, chunked) = head(&mut r)?;
    let mut text = String::new();
    body_lines(r, chunked, |l| text.push_str(l))?;
    let v: Value = serde_json::from_str(&text)?;
    if status != 200 {
        return Err(format!("{status}: {}", v["error"]["message"]).into());
    }
    println!(
        "{}",
        v["choices"][0]["message"]["content"].as_str().unwrap_or("")
    );
    let d = &v["drllm"];
    println!(
        "[{} prompt + {} generated tokens; path {} = {} of {} block passes; skipped {}, repeated {}]",
        v["usage"]["prompt_tokens"], v["usage"]["completion_tokens"], d["path"], d["passes"],
        d["n_layer"], d["skipped"], d["repeated"]
    );

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let mut r = post(&addr, "/v1/chat/completions", &streamed)?;
    let (status, chunked) = head(&mut r)?;
    if status != 200 {
        return Err(format!("stream: HTTP {status}").into());
    }
    body_lines(r, chunked, |l| {
        let Some(data) = l.strip_prefix("data: ") else {
            return;
        };
        if data == "[DONE]" {
            println!();
            return;
        }
        if let Ok(c) = serde_json::from_str::<Value>(data) {
            if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
                print!("{t}");
                let _ = std::io::stdout().flush();
            }
        }
    })?;
    Ok(())
}
