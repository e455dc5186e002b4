//! Local receivers for the carrier adapters, so tests send for real without leaving the
//! machine: [`SmtpSink`], an SMTP server, and [`HttpReceiver`], an HTTP server that
//! answers like Twilio's Messages API. Both record what they received, can be told to
//! fail the next N attempts, and count the distinct idempotency keys they saw (SMTP: by
//! Message-ID; HTTP: by `I-Twilio-Idempotency-Token`), which is what a de-duplicating
//! carrier would deliver.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The headers of an RFC 5322 text (folded lines unfolded), in order.
fn parse_headers(raw: &str) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in raw.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    headers
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ---- SMTP ---------------------------------------------------------------------------

/// One message an [`SmtpSink`] accepted.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// The envelope sender (MAIL FROM), without the angle brackets.
    pub from: String,
    /// The envelope recipients (RCPT TO).
    pub to: Vec<String>,
    /// The message as received, dot-unstuffed, lines joined with CRLF.
    pub raw: String,
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub list_unsubscribe: Option<String>,
    pub list_unsubscribe_post: Option<String>,
}

impl ReceivedMail {
    fn parse(from: String, to: Vec<String>, raw: String) -> Self {
        let headers = parse_headers(&raw);
        let get = |name: &str| find(&headers, name).map(str::to_owned);
        Self {
            message_id: get("Message-ID"),
            subject: get("Subject"),
            list_unsubscribe: get("List-Unsubscribe"),
            list_unsubscribe_post: get("List-Unsubscribe-Post"),
            from,
            to,
            raw,
            headers,
        }
    }

    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// What follows the header block.
    pub fn body(&self) -> &str {
        self.raw.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

#[derive(Default)]
struct SmtpState {
    messages: Vec<ReceivedMail>,
    /// Reply 451 (temporary failure) to this many more DATA commands.
    defer_data: usize,
    /// Reply 554 (permanent failure) to this many more DATA commands.
    reject_data: usize,
    data_attempts: usize,
    /// How long to wait, after recording a message, before answering its DATA with 250.
    accept_delay: Duration,
}

/// An SMTP server on 127.0.0.1 (EHLO/HELO, MAIL FROM, RCPT TO, DATA with
/// dot-unstuffing, RSET, NOOP, QUIT; no AUTH, no TLS). Stops when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    state: Arc<Mutex<SmtpState>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind smtp sink");
        let addr = listener.local_addr().expect("smtp sink address");
        let state = Arc::new(Mutex::new(SmtpState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = smtp_session(stream, state).await;
                });
            }
        });
        Self { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.state.lock().unwrap().messages.clone()
    }

    /// Replies `451` (try again later) to the next `n` DATA commands.
    pub fn defer_next_data(&self, n: usize) {
        self.state.lock().unwrap().defer_data = n;
    }

    /// The same as [`Self::defer_next_data`] (named like [`HttpReceiver::fail_next`]):
    /// the next `n` attempts fail temporarily.
    pub fn fail_next(&self, n: usize) {
        self.defer_next_data(n);
    }

    /// Replies `554` (transaction failed, permanently) to the next `n` DATA commands.
    pub fn reject_next_data(&self, n: usize) {
        self.state.lock().unwrap().reject_data = n;
    }

    /// Waits `delay` after recording each accepted message before answering `250`: a
    /// sender killed meanwhile has had its message received but not acknowledged.
    pub fn delay_acceptance(&self, delay: Duration) {
        self.state.lock().unwrap().accept_delay = delay;
    }

    /// DATA commands received, accepted or not.
    pub fn data_attempts(&self) -> usize {
        self.state.lock().unwrap().data_attempts
    }

    /// Distinct Message-IDs accepted: the messages a de-duplicating relay delivers.
    pub fn distinct_keys(&self) -> usize {
        let state = self.state.lock().unwrap();
        state
            .messages
            .iter()
            .filter_map(|m| m.message_id.clone())
            .collect::<BTreeSet<_>>()
            .len()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mailbox_of(arg: &str) -> String {
    let arg = arg.trim();
    match (arg.find('<'), arg.find('>')) {
        (Some(a), Some(b)) if a < b => arg[a + 1..b].to_owned(),
        _ => arg.split_whitespace().next().unwrap_or("").to_owned(),
    }
}

async fn smtp_session(stream: TcpStream, state: Arc<Mutex<SmtpState>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 sink ESMTP ready\r\n").await?;
    let (mut from, mut to) = (None::<String>, Vec::<String>::new());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end_matches(['\r', '\n']);
        let upper = command.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink greets you\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
        } else if upper.starts_with("HELO") {
            b"250 sink\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(mailbox_of(&command[10..]));
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                b"503 MAIL first\r\n"
            } else {
                to.push(mailbox_of(&command[8..]));
                b"250 OK\r\n"
            }
        } else if upper == "DATA" {
            if from.is_none() || to.is_empty() {
                b"503 RCPT first\r\n"
            } else {
                let refused = {
                    let mut s = state.lock().unwrap();
                    s.data_attempts += 1;
                    if s.defer_data > 0 {
                        s.defer_data -= 1;
                        Some(&b"451 4.3.0 try again later\r\n"[..])
                    } else if s.reject_data > 0 {
                        s.reject_data -= 1;
                        Some(&b"554 5.7.1 rejected\r\n"[..])
                    } else {
                        None
                    }
                };
                if let Some(refused) = refused {
                    from = None;
                    to.clear();
                    refused
                } else {
                    write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                    let mut body = Vec::new();
                    loop {
                        line.clear();
                        if lines.read_line(&mut line).await? == 0 {
                            return Ok(());
                        }
                        let text = line.trim_end_matches(['\r', '\n']);
                        if text == "." {
                            break;
                        }
                        body.push(text.strip_prefix('.').unwrap_or(text).to_owned());
                    }
                    let mail = ReceivedMail::parse(
                        from.take().unwrap_or_default(),
                        std::mem::take(&mut to),
                        body.join("\r\n"),
                    );
                    let delay = {
                        let mut s = state.lock().unwrap();
                        s.messages.push(mail);
                        s.accept_delay
                    };
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    b"250 OK queued\r\n"
                }
            }
        } else if upper == "RSET" {
            from = None;
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("NOOP") {
            b"250 OK\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

// ---- HTTP ---------------------------------------------------------------------------

/// One request an [`HttpReceiver`] received.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body as `application/x-www-form-urlencoded` fields.
    pub form: Vec<(String, String)>,
    /// What the receiver answered.
    pub status: u16,
}

impl ReceivedRequest {
    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// A form field's (first) value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct HttpState {
    requests: Vec<ReceivedRequest>,
    /// Answer the next N requests with this status instead of 201.
    fail: Option<(usize, u16)>,
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and answers like
/// Twilio's Messages API: `201 {"sid": "SM…", "status": "queued"}`. Stops when dropped.
pub struct HttpReceiver {
    addr: SocketAddr,
    state: Arc<Mutex<HttpState>>,
    task: JoinHandle<()>,
}

impl HttpReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http receiver");
        let addr = listener.local_addr().expect("http receiver address");
        let state = Arc::new(Mutex::new(HttpState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(req, state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (a carrier's base URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in order, failed ones included.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Answers the next `n` requests with 500.
    pub fn fail_next(&self, n: usize) {
        self.fail_next_with(n, 500);
    }

    /// Answers the next `n` requests with `status` (and a Twilio-like error body).
    pub fn fail_next_with(&self, n: usize, status: u16) {
        self.state.lock().unwrap().fail = Some((n, status));
    }

    /// Distinct `I-Twilio-Idempotency-Token`s among the requests answered 2xx: the
    /// messages a de-duplicating carrier delivers.
    pub fn distinct_keys(&self) -> usize {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|r| r.status < 300)
            .filter_map(|r| r.header("i-twilio-idempotency-token").map(str::to_owned))
            .collect::<BTreeSet<_>>()
            .len()
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(req: Request<Incoming>, state: Arc<Mutex<HttpState>>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form = form_urlencoded::parse(&body).into_owned().collect();
    let status = {
        let mut s = state.lock().unwrap();
        let status = match &mut s.fail {
            Some((n, status)) if *n > 0 => {
                *n -= 1;
                *status
            }
            _ => 201,
        };
        s.requests.push(ReceivedRequest {
            method,
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            form,
            status,
        });
        status
    };
    let json = if status < 300 {
        format!(
            r#"{{"sid":"SM{}","status":"queued"}}"#,
            uuid::Uuid::new_v4().simple()
        )
    } else {
        format!(
            r#"{{"code":{},"message":"sink failure","status":{status}}}"#,
            20000 + status
        )
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .expect("static response")
}
