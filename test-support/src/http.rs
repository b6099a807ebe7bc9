//! Plain HTTP calls to a running controller (blocking, `ureq`), for tests that drive the REST
//! API over a real socket.

use std::time::Duration;

use serde_json::Value;

/// `(status, json body)` of one request (`Value::Null` when the body is empty or not JSON),
/// with `Authorization: Bearer <token>` when given. Panics when the controller cannot be
/// reached at all: the caller is a test.
pub fn call(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut request = ureq::request(method, url).timeout(Duration::from_secs(30));
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    let response = match response {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
