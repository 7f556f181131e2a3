//! HTTP for the tests of the agent's status server and alarm sinks: free ports, plain GETs
//! (ureq), Prometheus's query API, and a receiver that keeps the bodies POSTed to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// A TCP port on 127.0.0.1 that was free a moment ago (nobody listens there yet; the UDP
/// one is [`crate::netns::free_udp_port`]).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET url` with a 5 s timeout: the body of a 2xx answer; `None` when the server is not
/// up (yet), answers another status, or the body is not text.
pub fn get(url: &str) -> Option<String> {
    ureq::get(url)
        .timeout(Duration::from_secs(5))
        .call()
        .ok()?
        .into_string()
        .ok()
}

/// `GET url` read as JSON; panics (`GET url`) when [`get`] gives nothing.
pub fn json(url: &str) -> Value {
    serde_json::from_str(&get(url).unwrap_or_else(|| panic!("GET {url}"))).unwrap()
}

/// Prometheus's instant query API at `prom` (`http://HOST:PORT`): the result vector of
/// `expr`, or Prometheus's error (also when it answers 4xx/5xx with one).
pub fn prom_query(prom: &str, expr: &str) -> Result<Vec<Value>, String> {
    let url = format!("{prom}/api/v1/query");
    let resp = ureq::get(&url)
        .query("query", expr)
        .timeout(Duration::from_secs(5))
        .call();
    let body: Value = match resp {
        Ok(r) => r.into_json().map_err(|e| e.to_string())?,
        Err(ureq::Error::Status(_, r)) => r.into_json().map_err(|e| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    };
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The value of the first series [`prom_query`] gives for `expr` (as Prometheus writes
/// it, a string); `None` on an error or an empty result.
pub fn prom_value(prom: &str, expr: &str) -> Option<String> {
    let result = prom_query(prom, expr).ok()?;
    Some(result.first()?["value"][1].as_str()?.to_string())
}

/// Reads one HTTP request from `s`, keeps its body (a request without one keeps nothing),
/// and answers `200 OK`, closing the connection.
pub fn serve_post<S: Read + Write>(mut s: S, bodies: &Mutex<Vec<String>>) {
    {
        let mut r = BufReader::new(&mut s);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        // A connection that never made a request (a refused handshake) keeps nothing.
        if len > 0 && r.read_exact(&mut body).is_ok() {
            bodies
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into());
        }
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = s.flush();
}

/// A minimal HTTP receiver (a webhook's endpoint) on `listener`, served on a thread of
/// its own one connection at a time: every request's body is kept in `bodies`, in order
/// (see [`serve_post`]).
pub fn post_receiver(listener: TcpListener, bodies: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { continue };
            serve_post(s, &bodies);
        }
    });
}
