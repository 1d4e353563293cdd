//! A blocking client for the admin API (what `shoalctl` uses), with errors
//! a person can act on: "cannot reach the controller at URL: connection
//! refused", "401: bad admin token".

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{Cancelled, Device, ErrorBody, Health, Job, LogEntry, NewJob};
use crate::distribution::multicast::SessionSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from {url}: {why}")]
    BadAnswer { url: String, why: String },
}

#[derive(Debug)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// Percent-encodes a path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) enum Method<'a, B> {
    Get,
    Delete,
    Post(Option<&'a B>),
}

impl Client {
    /// A client for the API at `base` (`http://127.0.0.1:7100`).
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_timeout(base, token, Some(Duration::from_secs(30)))
    }

    /// A client whose calls may take `timeout` (`None`: as long as the
    /// Controller works, e.g. while it encodes and verifies an image).
    pub fn with_timeout(base: &str, token: &str, timeout: Option<Duration>) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(timeout)
            .build();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method<'_, B>,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let sent = match method {
            Method::Get => self.agent.get(&url).header("Authorization", &auth).call(),
            Method::Delete => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            Method::Post(Some(body)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body),
            Method::Post(None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut resp = sent.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            why: why(&e),
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| ClientError::BadAnswer {
                url: url.clone(),
                why: why(&e),
            })?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| text.trim().chars().take(200).collect());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_str(&text).map_err(|e| ClientError::BadAnswer {
            url,
            why: e.to_string(),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<T, ()>(Method::Get, path)
    }

    pub fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health")
    }

    pub fn devices(&self) -> Result<Vec<Device>, ClientError> {
        self.get("/v1/devices")
    }

    pub fn device(&self, sel: &str) -> Result<Device, ClientError> {
        self.get(&format!("/v1/devices/{}", enc(sel)))
    }

    pub fn forget(&self, sel: &str) -> Result<Device, ClientError> {
        self.call::<_, ()>(Method::Delete, &format!("/v1/devices/{}", enc(sel)))
    }

    pub fn approve(&self, sel: &str) -> Result<Device, ClientError> {
        self.call::<_, ()>(
            Method::Post(None),
            &format!("/v1/devices/{}/approve", enc(sel)),
        )
    }

    pub fn jobs(&self, limit: Option<u32>) -> Result<Vec<Job>, ClientError> {
        match limit {
            Some(n) => self.get(&format!("/v1/jobs?limit={n}")),
            None => self.get("/v1/jobs"),
        }
    }

    pub fn create_job(&self, job: &NewJob) -> Result<Job, ClientError> {
        self.call(Method::Post(Some(job)), "/v1/jobs")
    }

    pub fn job(&self, id: &str) -> Result<Job, ClientError> {
        self.get(&format!("/v1/jobs/{}", enc(id)))
    }

    pub fn sessions(&self) -> Result<Vec<SessionSnapshot>, ClientError> {
        self.get("/v1/sessions")
    }

    pub fn session(&self, id: &str) -> Result<SessionSnapshot, ClientError> {
        self.get(&format!("/v1/sessions/{}", enc(id)))
    }

    pub fn cancel(&self, id: &str) -> Result<Cancelled, ClientError> {
        self.call::<_, ()>(Method::Post(None), &format!("/v1/jobs/{}/cancel", enc(id)))
    }

    pub fn logs(&self, device: Option<&str>, limit: u32) -> Result<Vec<LogEntry>, ClientError> {
        match device {
            Some(d) => self.get(&format!("/v1/logs?device={}&limit={limit}", enc(d))),
            None => self.get(&format!("/v1/logs?limit={limit}")),
        }
    }
}

/// A transport error in a few words.
fn why(e: &ureq::Error) -> String {
    use std::io::ErrorKind;
    match e {
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused".into(),
            ErrorKind::ConnectionReset => "connection reset".into(),
            ErrorKind::TimedOut => "timed out".into(),
            _ => io.to_string(),
        },
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::BadUri(u) => format!("bad URL {u:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_controller_is_named() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("http://127.0.0.1:{port}/"), "t");
        let e = c.devices().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot reach the controller at http://127.0.0.1:{port}: connection refused")
        );
        assert_eq!(enc("52:54:00:aa bb/x"), "52:54:00:aa%20bb%2Fx");
    }
}
