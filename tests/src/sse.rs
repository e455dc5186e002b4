//! A small Server-Sent Events client for the live stream's tests and benchmark: frames
//! parsed as the EventSource specification reads them (`id`, `event`, `data`, comments).

use std::time::Duration;

use serde_json::Value;

/// One message of the stream (a comment line alone is a frame with `comment`).
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub comment: Option<String>,
}

impl Frame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    pub fn position(&self) -> Option<i64> {
        self.id.as_deref().and_then(|i| i.parse().ok())
    }
}

/// An open stream.
pub struct SseClient {
    pub response: reqwest::Response,
    buf: String,
}

impl SseClient {
    /// Opens `url` with `token`, and `last_event_id` if given. Answers the response
    /// instead when it is not a 200.
    pub async fn open(
        http: &reqwest::Client,
        url: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Result<Self, reqwest::Response> {
        let mut rb = http
            .get(url)
            .bearer_auth(token)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id);
        }
        let response = rb.send().await.expect("request");
        if response.status() != 200 {
            return Err(response);
        }
        Ok(Self {
            response,
            buf: String::new(),
        })
    }

    /// The next frame, `None` when the stream ended or nothing came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                return Some(parse(&block));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next frame that is an event (comments skipped).
    pub async fn next_event(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next(left).await?;
            if f.event.is_some() || f.id.is_some() {
                return Some(f);
            }
        }
    }

    /// Events until `n` have arrived or `wait` passed.
    pub async fn events(&mut self, n: usize, wait: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(f) => out.push(f),
                None => break,
            }
        }
        out
    }
}

/// One block of lines.
pub fn parse(block: &str) -> Frame {
    let mut f = Frame::default();
    for line in block.lines() {
        if let Some(c) = line.strip_prefix(':') {
            f.comment = Some(c.trim().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => f.id = Some(value.to_owned()),
            "event" => f.event = Some(value.to_owned()),
            "data" => {
                if !f.data.is_empty() {
                    f.data.push('\n');
                }
                f.data.push_str(value);
            }
            _ => {}
        }
    }
    f
}
