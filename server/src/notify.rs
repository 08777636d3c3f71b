//! Telling the service manager how the daemon is doing: systemd's notify protocol (a datagram
//! to `$NOTIFY_SOCKET`), used by the unit's `Type=notify`: `READY=1` once the model is loaded
//! and requests are served, `STOPPING=1` when shutting down. Without `$NOTIFY_SOCKET` (not
//! started by systemd, or launchd, which has no readiness protocol) nothing is sent.

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the service manager; Ok(false) when
/// there is none to tell.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return Ok(false);
    };
    send(&path, state)
}

#[cfg(target_os = "linux")]
fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<bool> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // '@' names a socket in the abstract namespace
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

#[cfg(all(unix, not(target_os = "linux")))]
fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<bool> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.send_to(state.as_bytes(), path)?;
    Ok(true)
}

#[cfg(not(unix))]
fn send(_: &std::ffi::OsStr, _: &str) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(all(test, unix))]
mod tests {
    #[test]
    fn sends_a_datagram_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
        assert!(super::send(p.as_os_str(), "READY=1\nSTATUS=x").unwrap());
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }
}
