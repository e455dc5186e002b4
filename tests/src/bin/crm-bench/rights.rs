//! The data-subject rights phases of `scripts/bench --rights` (issue 14; figures:
//! docs/benchmarks.md).
//!
//! - `rights-seed` (not timed as a figure): `--contacts` contacts with 20 events each,
//!   over `--connections` connections, one contact at a time per connection: the
//!   contact (`POST /v1/contacts`, 1 event), 15 changes of its title (`PATCH
//!   /v1/contacts/{id}`, 15), marketing e-mail consent granted with its notice (`POST
//!   /v1/contacts/{id}/consent`, 1), a service e-mail (`POST /v1/contacts/{id}/messages`,
//!   queued: 1, a message key the contact owns), the consent withdrawn (1) and a second
//!   e-mail (1). Every other contact (even index) is to be erased, the rest stay live;
//!   their ids go to `--ids` (`erase ID` / `live ID` lines). The events written are
//!   counted in the database (the service is otherwise idle), to check the 20. Then
//!   one more contact like them is erased alone, so that the organisation's
//!   suppression key (created on its first erasure) exists before the measured
//!   erasures: they measure erasure in an organisation that has erased before.
//! - `rights-erase`: `POST /v1/contacts/{id}/erase` of every `erase` contact over
//!   `--connections` connections, closed loop: contacts erased per second over the
//!   wall time of all the erasures, latency percentiles per erasure, and how many
//!   receipts said `complete` (every purging read model applied the tombstone within
//!   the route's wait) or `purging`.
//! - `rights-read`: `GET /v1/contacts/{id}` of erased contacts beside live ones,
//!   alternating in 1 s slices (one of each as warm-up, then `--seconds` of each), as
//!   `ai-actions` does: both rates, percentiles and their ratio. An erased answer counts
//!   only with `erased_at` set and no e-mail; a live one only with its e-mail and
//!   `erased_at` null.
//! - `rights-links` (not timed as a figure): a preference-center link (`POST
//!   /v1/contacts/{id}/preference-link`) for each of the first `--links` live contacts;
//!   their tokens go to `--out`, and the first link's page is fetched once to check it.
//! - `rights-page`: the preference center page (`GET /preferences?token=`, the links
//!   in turn) beside `GET /healthz`, alternating in 1 s slices as `rights-read` does:
//!   both rates, percentiles and their ratio. A page counts only if it is a 200 with a
//!   `<fieldset>` (the form's; the page that says a link is unknown has none).
//!
//! Each prints one line of `key=value` fields ending with `cpu_s`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{contact, cpu_seconds, histogram, ms, run_tag, Conn, Target};

/// The changes of title each contact gets after its creation (with the two consent
/// records and the two messages: 20 events).
const TITLE_CHANGES: u64 = 15;

/// The grant of marketing e-mail consent, with the notice shown.
fn grant() -> Value {
    json!({"channel": "email", "purpose": "marketing", "status": "granted", "source": "import",
           "notice": {"id": "pp", "version": "1",
                      "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}})
}

/// A service e-mail: allowed by the gate on the contract, without any consent record.
fn message(k: u64) -> Value {
    json!({"channel": "email", "purpose": "service", "subject": format!("Hi {k}"),
           "body": "Hello"})
}

/// Sends one request as `conn`; the status must be `want`. The answer, as JSON.
async fn call(
    conn: &mut Conn,
    method: hyper::Method,
    path: &str,
    body: Option<&Value>,
    want: hyper::StatusCode,
) -> anyhow::Result<Value> {
    let body = body
        .map(|b| serde_json::to_vec(b).map(bytes::Bytes::from))
        .transpose()?;
    let (status, answer) = conn
        .send(method.clone(), path, body)
        .await
        .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
    anyhow::ensure!(
        status == want,
        "{method} {path}: status {status}: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    Ok(serde_json::from_slice(&answer)?)
}

async fn connect(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (db, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(db)
}

async fn events_in(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0))
}

#[derive(Args)]
pub(crate) struct SeedArgs {
    #[command(flatten)]
    target: Target,
    /// Contacts to create (half to erase, half to stay live).
    #[arg(long, default_value_t = 2000)]
    contacts: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Where to write the ids: one `erase ID` or `live ID` a line.
    #[arg(long)]
    ids: std::path::PathBuf,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

/// One contact and its 19 further events.
async fn seed_one(conn: &mut Conn, tag: u64, n: u64) -> anyhow::Result<Uuid> {
    use hyper::{Method, StatusCode};
    let created = call(
        conn,
        Method::POST,
        "/v1/contacts",
        Some(&contact(tag, n)),
        StatusCode::CREATED,
    )
    .await?;
    let id: Uuid = created["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("POST /v1/contacts: no id in {created}"))?;
    let path = format!("/v1/contacts/{id}");
    for k in 1..=TITLE_CHANGES {
        call(
            conn,
            Method::PATCH,
            &path,
            Some(&json!({"title": format!("T{k}")})),
            StatusCode::OK,
        )
        .await?;
    }
    let consent = format!("{path}/consent");
    let messages = format!("{path}/messages");
    for (k, (to, body)) in [
        (&consent, grant()),
        (&messages, message(1)),
        (&consent, super::consent::withdrawal()),
        (&messages, message(2)),
    ]
    .into_iter()
    .enumerate()
    {
        let answer = call(conn, Method::POST, to, Some(&body), StatusCode::CREATED).await?;
        anyhow::ensure!(
            to == &consent || answer["status"] == "queued",
            "message {k} of {id} was not queued: {answer}"
        );
    }
    Ok(id)
}

pub(crate) async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    let SeedArgs {
        target: t,
        contacts,
        connections,
        ids,
        database_url,
    } = args;
    let db = connect(&database_url).await?;
    let before = events_in(&db).await?;
    let tag = run_tag();
    let next = Arc::new(AtomicU64::new(0));
    let made = Arc::new(Mutex::new(Vec::with_capacity(contacts as usize)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(&t)?;
        let (next, made) = (next.clone(), made.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= contacts {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = seed_one(&mut conn, tag, n).await?;
                made.lock().await.push((n, id));
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut made = std::mem::take(&mut *made.lock().await);
    made.sort_unstable();
    let lines: String = made
        .iter()
        .map(|(n, id)| format!("{} {id}\n", if n % 2 == 0 { "erase" } else { "live" }))
        .collect();
    std::fs::write(&ids, lines)?;
    let events = events_in(&db).await? - before;
    // The organisation's first erasure, alone (not measured).
    let mut conn = Conn::new(&t)?;
    let first = seed_one(&mut conn, tag, contacts).await?;
    let receipt = call(
        &mut conn,
        hyper::Method::POST,
        &format!("/v1/contacts/{first}/erase"),
        None,
        hyper::StatusCode::OK,
    )
    .await?;
    println!(
        "rights-seed contacts={} connections={connections} events={events} \
         events_per_contact={:.2} seconds={seconds:.1} first_erasure={} cpu_s={}",
        made.len(),
        events as f64 / made.len().max(1) as f64,
        receipt["status"].as_str().unwrap_or("none"),
        cpu_seconds()
    );
    Ok(())
}

/// The ids of `--ids` marked `kind`.
fn read_ids(path: &std::path::Path, kind: &str) -> anyhow::Result<Arc<Vec<Uuid>>> {
    let text = std::fs::read_to_string(path)?;
    let ids: Vec<Uuid> = text
        .lines()
        .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!ids.is_empty(), "no `{kind}` ids in {}", path.display());
    Ok(Arc::new(ids))
}

#[derive(Args)]
pub(crate) struct EraseArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// The file `rights-seed` wrote.
    #[arg(long)]
    ids: std::path::PathBuf,
}

pub(crate) async fn erase(args: EraseArgs) -> anyhow::Result<()> {
    let EraseArgs {
        target: t,
        connections,
        ids,
    } = args;
    let ids = read_ids(&ids, "erase")?;
    let next = Arc::new(AtomicU64::new(0));
    let (complete, purging, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let last_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(&t)?;
        let (ids, next, complete, purging, errors, last_error) = (
            ids.clone(),
            next.clone(),
            complete.clone(),
            purging.clone(),
            errors.clone(),
            last_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(id) = ids.get(n) else {
                    return local;
                };
                let t0 = Instant::now();
                let answer = call(
                    &mut conn,
                    hyper::Method::POST,
                    &format!("/v1/contacts/{id}/erase"),
                    None,
                    hyper::StatusCode::OK,
                )
                .await;
                let took = t0.elapsed();
                match answer {
                    Ok(v) if v["status"] == "complete" || v["status"] == "purging" => {
                        local.record(took.as_micros() as u64).unwrap();
                        let which = if v["status"] == "complete" {
                            &complete
                        } else {
                            &purging
                        };
                        which.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(v) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        *last_error.lock().await = Some(format!("no receipt status: {v}"));
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        *last_error.lock().await = Some(e.to_string());
                    }
                }
            }
        }));
    }
    let mut h = histogram();
    for task in tasks {
        h.add(task.await?)?;
    }
    let wall = start.elapsed().as_secs_f64();
    if let Some(e) = last_error.lock().await.as_ref() {
        eprintln!("crm-bench rights-erase: last error: {e}");
    }
    println!(
        "rights-erase connections={connections} contacts={} erased={} seconds={wall:.2} \
         erased_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} complete={} purging={} \
         errors={} cpu_s={}",
        ids.len(),
        h.len(),
        h.len() as f64 / wall,
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        complete.load(Ordering::Relaxed),
        purging.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        cpu_seconds()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct ReadArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds of each of the two (alternating in 1 s slices).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The file `rights-seed` wrote (the `erase` contacts erased by `rights-erase`).
    #[arg(long)]
    ids: std::path::PathBuf,
}

/// What one side of the alternation measured, while it runs.
struct Side {
    latency: Mutex<Histogram<u64>>,
    errors: AtomicU64,
    bytes: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Side {
    fn new() -> Self {
        Self {
            latency: Mutex::new(histogram()),
            errors: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

/// What one side of the alternation measured: the latency of the answers counted,
/// the requests that failed or were not as expected, and the bytes of the answers
/// counted.
struct Measured {
    latency: Histogram<u64>,
    errors: u64,
    bytes: u64,
}

impl Measured {
    /// Answers counted per second over `seconds`.
    fn rate(&self, seconds: u64) -> f64 {
        self.latency.len() as f64 / seconds as f64
    }

    /// The mean size of an answer counted, in bytes.
    fn mean_bytes(&self) -> u64 {
        self.bytes / self.latency.len().max(1)
    }
}

/// `a / b`, or 0 when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Two kinds of GET over `connections` connections, alternating in 1 s slices so that
/// both see the same machine, as `ai-actions` does: one slice of each first (warm-up,
/// not counted), then `seconds` of each; slice k is side k % 2. `path(side, n)` is the
/// path of request n (n counts the requests of both sides). An answer counts only if
/// it is a 200 and `ok(side, body)`, and only if it was sent and answered inside one
/// measured slice. `what` and `names` label the last error of each side (on stderr).
async fn alternate(
    t: &Target,
    connections: usize,
    seconds: u64,
    (what, names): (&str, [&str; 2]),
    path: impl Fn(usize, usize) -> String + Send + Sync + 'static,
    ok: impl Fn(usize, &[u8]) -> bool + Send + Sync + 'static,
) -> anyhow::Result<[Measured; 2]> {
    let (path, ok) = (Arc::new(path), Arc::new(ok));
    let counter = Arc::new(AtomicU64::new(0));
    let sides = Arc::new([Side::new(), Side::new()]);
    let slices = 2 * (seconds + 1);
    let start = Instant::now();
    let slice_of = move |at: Instant| (at - start).as_millis() as u64 / 1000;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(t)?;
        let (path, ok, counter, sides) = (path.clone(), ok.clone(), counter.clone(), sides.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let t0 = Instant::now();
                let slice = slice_of(t0);
                if slice >= slices {
                    break;
                }
                let side = (slice % 2) as usize;
                let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
                let result = conn.send(hyper::Method::GET, &path(side, n), None).await;
                // Only requests sent and answered inside one measured slice count.
                if slice < 2 || slice_of(Instant::now()) != slice {
                    continue;
                }
                let s = &sides[side];
                match result {
                    Ok((status, answer))
                        if status == hyper::StatusCode::OK && ok(side, &answer) =>
                    {
                        s.latency
                            .lock()
                            .await
                            .record(t0.elapsed().as_micros() as u64)
                            .unwrap();
                        s.bytes.fetch_add(answer.len() as u64, Ordering::Relaxed);
                    }
                    Ok((status, answer)) => {
                        s.errors.fetch_add(1, Ordering::Relaxed);
                        *s.last_error.lock().await = Some(format!(
                            "status {status}: {}",
                            String::from_utf8_lossy(&answer[..answer.len().min(300)])
                        ));
                    }
                    Err(e) => {
                        s.errors.fetch_add(1, Ordering::Relaxed);
                        *s.last_error.lock().await = Some(e);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let mut measured = Vec::with_capacity(2);
    for (name, s) in names.iter().zip(sides.iter()) {
        if let Some(e) = s.last_error.lock().await.as_ref() {
            eprintln!("crm-bench {what}: {name}: last error: {e}");
        }
        measured.push(Measured {
            latency: s.latency.lock().await.clone(),
            errors: s.errors.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        });
    }
    let [a, b]: [Measured; 2] = measured
        .try_into()
        .map_err(|_| anyhow::anyhow!("two sides"))?;
    Ok([a, b])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a 200 answer is what the side expects: live, its e-mail and no erasure;
/// erased, an erasure time and no e-mail.
fn as_expected(erased: bool, body: &[u8]) -> bool {
    let (has_email, live) = (
        contains(body, b"\"email\":\""),
        contains(body, b"\"erased_at\":null"),
    );
    if erased {
        !has_email && !live && contains(body, b"\"erased_at\":\"")
    } else {
        has_email && live
    }
}

pub(crate) async fn read(args: ReadArgs) -> anyhow::Result<()> {
    let ReadArgs {
        target: t,
        connections,
        seconds,
        ids,
    } = args;
    // Side 0 (even slices): live contacts; side 1 (odd): erased ones.
    let sets = Arc::new([read_ids(&ids, "live")?, read_ids(&ids, "erase")?]);
    let paths = sets.clone();
    let [l, e] = alternate(
        &t,
        connections,
        seconds,
        ("rights-read", ["live", "erased"]),
        move |side, n| {
            let set = &paths[side];
            format!("/v1/contacts/{}", set[n % set.len()])
        },
        |side, body| as_expected(side == 1, body),
    )
    .await?;
    let (l_rate, e_rate) = (l.rate(seconds), e.rate(seconds));
    println!(
        "rights-read connections={connections} seconds={seconds} erased_contacts={} \
         live_contacts={} erased_per_s={e_rate:.0} erased_p50_ms={:.2} erased_p99_ms={:.2} \
         erased_errors={} live_per_s={l_rate:.0} live_p50_ms={:.2} live_p99_ms={:.2} \
         live_errors={} ratio={:.2} p50_ratio={:.2} cpu_s={}",
        sets[1].len(),
        sets[0].len(),
        ms(&e.latency, 0.5),
        ms(&e.latency, 0.99),
        e.errors,
        ms(&l.latency, 0.5),
        ms(&l.latency, 0.99),
        l.errors,
        ratio(e_rate, l_rate),
        ratio(ms(&e.latency, 0.5), ms(&l.latency, 0.5)),
        cpu_seconds()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct LinksArgs {
    #[command(flatten)]
    target: Target,
    /// The file `rights-seed` wrote: the first `--links` of its `live` contacts get a
    /// link each.
    #[arg(long)]
    ids: std::path::PathBuf,
    #[arg(long, default_value_t = 200)]
    links: usize,
    /// Where to write the links' tokens, one a line (created readable by its owner
    /// only; the tokens open the contacts' pages).
    #[arg(long)]
    out: std::path::PathBuf,
}

/// Whether a 200 answer of `GET /preferences` is the contact's page: its form has one
/// `<fieldset>` per purpose (a notice page, such as "link unknown", has none).
fn is_page(body: &[u8]) -> bool {
    contains(body, b"<fieldset>")
}

/// The path of the page a token opens.
fn page_path(token: &str) -> String {
    let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    format!("/preferences?token={token}")
}

pub(crate) async fn links(args: LinksArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let LinksArgs {
        target: t,
        ids,
        links,
        out,
    } = args;
    let live = read_ids(&ids, "live")?;
    anyhow::ensure!(
        live.len() >= links,
        "{links} links need as many live contacts ({} in {})",
        live.len(),
        ids.display()
    );
    let start = Instant::now();
    let mut conn = Conn::new(&t)?;
    let mut tokens = Vec::with_capacity(links);
    for id in &live[..links] {
        let path = format!("/v1/contacts/{id}/preference-link");
        let link = call(
            &mut conn,
            hyper::Method::POST,
            &path,
            Some(&json!({})),
            hyper::StatusCode::CREATED,
        )
        .await?;
        let token = link["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow::anyhow!("POST {path}: no token in the answer"))?;
        anyhow::ensure!(
            link["expires_at"].is_string()
                && link["url"].as_str().is_some_and(|u| u.ends_with(token)),
            "POST {path}: no url or expires_at in the answer"
        );
        tokens.push(token.to_owned());
    }
    let seconds = start.elapsed().as_secs_f64();
    // The first page, once: fail here rather than count 10 s of errors.
    let (status, body) = conn
        .send(hyper::Method::GET, &page_path(&tokens[0]), None)
        .await
        .map_err(|e| anyhow::anyhow!("GET /preferences: {e}"))?;
    anyhow::ensure!(
        status == hyper::StatusCode::OK && is_page(&body),
        "GET /preferences: status {status}, not the contact's page: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&out)?;
    for token in &tokens {
        writeln!(file, "{token}")?;
    }
    println!(
        "rights-links links={} seconds={seconds:.2} page_bytes={} cpu_s={}",
        tokens.len(),
        body.len(),
        cpu_seconds()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct PageArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds of each of the two (alternating in 1 s slices).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The file `rights-links` wrote.
    #[arg(long)]
    tokens: std::path::PathBuf,
}

pub(crate) async fn page(args: PageArgs) -> anyhow::Result<()> {
    let PageArgs {
        target: t,
        connections,
        seconds,
        tokens,
    } = args;
    let pages: Vec<String> = std::fs::read_to_string(&tokens)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(page_path)
        .collect();
    anyhow::ensure!(!pages.is_empty(), "no tokens in {}", tokens.display());
    let links = pages.len();
    // Side 0 (even slices): GET /healthz; side 1 (odd): the pages, in turn.
    let [h, p] = alternate(
        &t,
        connections,
        seconds,
        ("rights-page", ["healthz", "page"]),
        move |side, n| {
            if side == 0 {
                "/healthz".to_owned()
            } else {
                pages[n % pages.len()].clone()
            }
        },
        |side, body| side == 0 || is_page(body),
    )
    .await?;
    let (h_rate, p_rate) = (h.rate(seconds), p.rate(seconds));
    println!(
        "rights-page connections={connections} seconds={seconds} links={links} \
         page_per_s={p_rate:.0} page_p50_ms={:.2} page_p99_ms={:.2} page_errors={} \
         page_bytes={} healthz_per_s={h_rate:.0} healthz_p50_ms={:.2} healthz_p99_ms={:.2} \
         healthz_errors={} ratio={:.2} p50_ratio={:.2} cpu_s={}",
        ms(&p.latency, 0.5),
        ms(&p.latency, 0.99),
        p.errors,
        p.mean_bytes(),
        ms(&h.latency, 0.5),
        ms(&h.latency, 0.99),
        h.errors,
        ratio(p_rate, h_rate),
        ratio(ms(&p.latency, 0.5), ms(&h.latency, 0.5)),
        cpu_seconds()
    );
    Ok(())
}
