//! The scale phase of `scripts/bench --scale` (docs/benchmarks.md): one organisation
//! grown through `POST /v1/contacts`, and the documented reads timed at each size.
//!
//! - `scale-seed`: before the first step, a few contacts with long streams (PATCHed
//!   `--long-events` times each) and a second staff user who does a few things (the
//!   rare actor of the activity log); prints the ids and times the reads need.
//! - `scale-grow`: contacts `--from`..`--to` (their data a deterministic function of
//!   their number, so every run writes the same names), then a few contacts with the
//!   rare marker word and a few archives; prints the growth's contacts/s.
//! - `read`: one GET, sequentially: warm-up, then measured requests; prints p50/p95.
//!
//! Each prints one line of `key=value` fields (values without spaces).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{cpu_seconds, histogram, ms, Conn, Target};

/// The word in the family name of the few marker contacts each step adds: a `q=`
/// with few hits. No generated name, e-mail or company contains it.
const RARE_WORD: &str = "zyzzyva";

const GIVEN: &[&str] = &[
    "Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Karin",
    "Liam", "Maria", "Noah", "Olga", "Paul", "Quentin", "Rosa", "Simon", "Tara", "Umar", "Vera",
    "Walter", "Xenia", "Yusuf", "Zoe", "Aisha", "Bruno", "Chloe", "Diego", "Emma", "Farid",
    "Greta", "Hannah", "Ivan", "Julia", "Kenji", "Lena", "Marco", "Nina", "Oscar", "Priya",
    "Rafael", "Sofia", "Tomas", "Ulla", "Victor", "Wanda", "Ahmed", "Beatriz", "Connor", "Dana",
    "Erik", "Fatima", "Georg", "Helena", "Isak", "Jana", "Kofi", "Lucia", "Mateo", "Nadia", "Omar",
    "Pia",
];

/// About one family name in seven ends in "son" (the common `q=` term).
const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Thompson",
    "White",
    "Harris",
    "Clark",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Mueller",
    "Schmidt",
    "Schneider",
    "Fischer",
    "Weber",
    "Meyer",
    "Wagner",
    "Becker",
    "Schulz",
    "Hoffmann",
    "Rossi",
    "Russo",
    "Ferrari",
    "Esposito",
    "Bianchi",
    "Romano",
    "Dubois",
    "Laurent",
    "Moreau",
    "Lefebvre",
    "Nilsson",
    "Larsson",
    "Nowak",
    "Kowalski",
    "Novak",
    "Horvat",
    "Yamamoto",
    "Tanaka",
    "Kim",
    "Park",
    "Singh",
    "Okafor",
];

const COMPANY_A: &[&str] = &[
    "Northwind",
    "Blue",
    "Silver",
    "Granite",
    "Harbor",
    "Summit",
    "Maple",
    "Falcon",
    "Cedar",
    "Atlas",
    "Beacon",
    "Copper",
    "Delta",
    "Ember",
    "Fjord",
    "Golden",
    "Iron",
    "Juniper",
    "Lumen",
    "Meridian",
    "Nova",
    "Orchid",
    "Pioneer",
    "Quarry",
    "Redwood",
    "Sterling",
    "Tidal",
    "Union",
    "Vertex",
    "Willow",
    "Apex",
    "Birch",
];

const COMPANY_B: &[&str] = &[
    "Analytics",
    "Logistics",
    "Dynamics",
    "Foods",
    "Textiles",
    "Robotics",
    "Energy",
    "Media",
    "Health",
    "Capital",
    "Systems",
    "Labs",
    "Studios",
    "Partners",
    "Motors",
    "Pharma",
    "Software",
    "Consulting",
    "Freight",
    "Optics",
    "Finance",
    "Retail",
    "Marine",
    "Security",
    "Design",
    "Telecom",
    "Farms",
    "Brewing",
    "Aviation",
    "Chemicals",
    "Insurance",
    "Builders",
];

const COMPANY_SUFFIX: &[&str] = &["Ltd", "GmbH", "Inc", "AG", "SARL", "BV", "LLC", "Oy"];

const DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "mail.example",
    "post.example",
    "inbox.example",
    "corp.example",
    "web.example",
    "net.example",
];

const TITLES: &[&str] = &[
    "Buyer",
    "Head of Sales",
    "CTO",
    "Office Manager",
    "Accountant",
    "Engineer",
    "Director",
    "Consultant",
];

const CITIES: &[(&str, &str)] = &[
    ("Berlin", "DE"),
    ("Hamburg", "DE"),
    ("Paris", "FR"),
    ("Lyon", "FR"),
    ("London", "GB"),
    ("Leeds", "GB"),
    ("Madrid", "ES"),
    ("Milan", "IT"),
    ("Vienna", "AT"),
    ("Zurich", "CH"),
    ("Oslo", "NO"),
    ("Warsaw", "PL"),
];

/// splitmix64: a fixed, well-spread pseudo-random function of the contact's number.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pick<T: Copy>(list: &[T], h: u64) -> T {
    list[(h % list.len() as u64) as usize]
}

/// Contact number `n`: names, e-mail (unique by `n`), phone, company, title, address
/// and a custom field, all picked from the word lists by a hash of `n`.
fn person(n: u64) -> Value {
    let h = mix(n);
    let given = pick(GIVEN, h);
    let family = pick(FAMILY, h >> 8);
    let company = format!(
        "{} {} {}",
        pick(COMPANY_A, h >> 16),
        pick(COMPANY_B, h >> 24),
        pick(COMPANY_SUFFIX, h >> 32)
    );
    let (city, country) = pick(CITIES, h >> 36);
    json!({
        "given_name": given,
        "family_name": family,
        "email": format!(
            "{}.{}.{n}@{}",
            given.to_lowercase(),
            family.to_lowercase(),
            pick(DOMAINS, h >> 40)
        ),
        "phone": format!("+4420{:08}", (h >> 20) % 100_000_000),
        "company": company,
        "title": pick(TITLES, h >> 44),
        "address": {"city": city, "country": country},
        "custom": {"n": n, "segment": pick(&["a", "b", "c", "d"], h >> 48)}
    })
}

/// Numbers of the contacts outside the growth (`person` of these): markers, long
/// contacts, the second user's.
const MARKER_BASE: u64 = 1_000_000_000_000;
const LONG_BASE: u64 = 2_000_000_000_000;
const SECOND_BASE: u64 = 3_000_000_000_000;

/// A contact with the rare marker word in its family name.
fn marker(step_to: u64, i: u64) -> Value {
    let mut v = person(MARKER_BASE + step_to * 100 + i);
    v["family_name"] = json!("Zyzzyva");
    v["email"] = json!(format!("{RARE_WORD}.{step_to}.{i}@example.net"));
    v
}

/// Now, as an RFC 3339 time with microseconds, in UTC (`Z`).
fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn body(v: &Value) -> Option<bytes::Bytes> {
    Some(bytes::Bytes::from(serde_json::to_vec(v).expect("JSON")))
}

/// Sends a request and parses the JSON answer; an error unless the status is `want`.
async fn call(
    conn: &mut Conn,
    method: hyper::Method,
    path: &str,
    payload: Option<&Value>,
    want: hyper::StatusCode,
) -> Result<Value, String> {
    let (status, bytes) = conn.send(method, path, payload.and_then(body)).await?;
    if status != want {
        return Err(format!("{path}: status {status}"));
    }
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: {e}"))
}

fn id_of(v: &Value) -> Result<String, String> {
    v["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "answer without an id".to_owned())
}

#[derive(Args)]
pub struct SeedArgs {
    #[command(flatten)]
    target: Target,
    /// Contacts with long streams.
    #[arg(long, default_value_t = 3)]
    long_contacts: u64,
    /// Changes (PATCH) per long contact, after its creation.
    #[arg(long, default_value_t = 2000)]
    long_events: u64,
    /// Contacts the second user creates (and changes once each).
    #[arg(long, default_value_t = 5)]
    second_user_contacts: u64,
}

/// Times recorded while the first long contact is changed.
#[derive(Default)]
struct LongTimes {
    /// Before its change at 45 % of the stream was sent.
    window_since: String,
    /// After its change at 50 % was answered (and before the next was sent).
    as_of: String,
    /// After its change at 55 % was answered.
    window_until: String,
}

pub async fn seed(a: SeedArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let t = &a.target;
    let mut conn = Conn::new(t)?;
    let me = call(
        &mut conn,
        hyper::Method::GET,
        "/v1/me",
        None,
        hyper::StatusCode::OK,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let owner_id = me["user_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("/v1/me: no user_id"))?
        .to_owned();
    let org_id = me["org_id"].as_str().unwrap_or_default().to_owned();

    // The long contacts, changed in parallel, each stream in order.
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..a.long_contacts {
        let mut conn = Conn::new(t)?;
        let errors = errors.clone();
        let n = a.long_events;
        tasks.push(tokio::spawn(async move {
            let mut v = person(LONG_BASE + i);
            v["family_name"] = json!("Longstream");
            let id = id_of(
                &call(
                    &mut conn,
                    hyper::Method::POST,
                    "/v1/contacts",
                    Some(&v),
                    hyper::StatusCode::CREATED,
                )
                .await?,
            )?;
            let path = format!("/v1/contacts/{id}");
            let mut times = LongTimes::default();
            for k in 1..=n {
                if k == n * 45 / 100 {
                    times.window_since = now_rfc3339();
                }
                let change = json!({"title": format!("Revision {k}")});
                if call(
                    &mut conn,
                    hyper::Method::PATCH,
                    &path,
                    Some(&change),
                    hyper::StatusCode::OK,
                )
                .await
                .is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if k == n / 2 {
                    times.as_of = now_rfc3339();
                } else if k == n * 55 / 100 {
                    times.window_until = now_rfc3339();
                }
            }
            Ok::<_, String>((id, times))
        }));
    }
    let mut long_ids = Vec::new();
    let mut times = LongTimes::default();
    for (i, task) in tasks.into_iter().enumerate() {
        let (id, t) = task.await?.map_err(anyhow::Error::msg)?;
        if i == 0 {
            times = t;
        }
        long_ids.push(id);
    }

    // The second user: a Team member with a password nobody sees, who creates a few
    // contacts and changes each once.
    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let email = "second.user@bench.example";
    let created = call(
        &mut conn,
        hyper::Method::POST,
        "/v1/users",
        Some(&json!({"email": email, "display_name": "Second User", "role": "team", "password": password})),
        hyper::StatusCode::CREATED,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let second_user_id = id_of(&created).map_err(anyhow::Error::msg)?;
    let login = call(
        &mut conn,
        hyper::Method::POST,
        "/v1/auth/login",
        Some(&json!({"email": email, "password": password})),
        hyper::StatusCode::OK,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let token = login["access_token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("login of the second user: no access_token"))?;
    let mut second = Conn::with_token(&t.url, token)?;
    let mut second_actions = 0;
    for i in 0..a.second_user_contacts {
        let v = person(SECOND_BASE + i);
        let Ok(id) = call(
            &mut second,
            hyper::Method::POST,
            "/v1/contacts",
            Some(&v),
            hyper::StatusCode::CREATED,
        )
        .await
        .and_then(|v| id_of(&v)) else {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        second_actions += 1;
        match call(
            &mut second,
            hyper::Method::PATCH,
            &format!("/v1/contacts/{id}"),
            Some(&json!({"title": "Key account"})),
            hyper::StatusCode::OK,
        )
        .await
        {
            Ok(_) => second_actions += 1,
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    println!(
        "scale-seed org_id={org_id} owner_id={owner_id} second_user_id={second_user_id} \
         second_actions={second_actions} long_ids={} long_events={} as_of={} \
         window_since={} window_until={} errors={} seconds={:.1} cpu_s={}",
        long_ids.join(","),
        a.long_events,
        times.as_of,
        times.window_since,
        times.window_until,
        errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        cpu_seconds()
    );
    Ok(())
}

#[derive(Args)]
pub struct GrowArgs {
    #[command(flatten)]
    target: Target,
    /// The first contact number to create.
    #[arg(long)]
    from: u64,
    /// One past the last.
    #[arg(long)]
    to: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Marker contacts (the rare `q=` word) added after the growth.
    #[arg(long, default_value_t = 5)]
    markers: u64,
    /// Contacts of this step archived after the growth.
    #[arg(long, default_value_t = 10)]
    archive: u64,
}

pub async fn grow(a: GrowArgs) -> anyhow::Result<()> {
    let GrowArgs {
        target: t,
        from,
        to,
        connections,
        markers,
        archive,
    } = a;
    anyhow::ensure!(to > from, "--to must be above --from");
    let span = to - from;
    // The contacts whose ids are kept: one in the middle (read by the bench), and the
    // ones to archive, spread over the step.
    let sample = from + span / 2;
    let mut keep: Vec<u64> = (0..archive.min(span))
        .map(|k| from + k * span / archive.max(1) + span / archive.max(1) / 3)
        .filter(|&n| n != sample && n < to)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let to_archive = keep.clone();
    keep.push(sample);
    let keep = Arc::new(keep);
    let ids = Arc::new(Mutex::new(HashMap::<u64, String>::new()));

    let counter = Arc::new(AtomicU64::new(from));
    let errors = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(&t)?;
        let (counter, errors, last_error, keep, ids) = (
            counter.clone(),
            errors.clone(),
            last_error.clone(),
            keep.clone(),
            ids.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            loop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                if n >= to {
                    break;
                }
                let t0 = Instant::now();
                let result = conn
                    .send(hyper::Method::POST, "/v1/contacts", body(&person(n)))
                    .await;
                match result {
                    Ok((hyper::StatusCode::CREATED, bytes)) => {
                        local.record(t0.elapsed().as_micros() as u64).unwrap();
                        if keep.contains(&n) {
                            if let Some(id) = serde_json::from_slice::<Value>(&bytes)
                                .ok()
                                .and_then(|v| id_of(&v).ok())
                            {
                                ids.lock().await.insert(n, id);
                            }
                        }
                    }
                    Ok((status, _)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        *last_error.lock().await = Some(format!("status {status}"));
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        *last_error.lock().await = Some(e);
                    }
                }
            }
            local
        }));
    }
    let mut h = histogram();
    for task in tasks {
        h.add(task.await?)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Every contact of the growth was answered before this time: `updated_since` with
    // it matches only what follows (markers, archives).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let updated_since = now_rfc3339();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let mut conn = Conn::new(&t)?;
    let mut extra_errors = 0;
    let mut marked = 0;
    for i in 0..markers {
        match call(
            &mut conn,
            hyper::Method::POST,
            "/v1/contacts",
            Some(&marker(to, i)),
            hyper::StatusCode::CREATED,
        )
        .await
        {
            Ok(_) => marked += 1,
            Err(e) => {
                extra_errors += 1;
                *last_error.lock().await = Some(e);
            }
        }
    }
    let ids = std::mem::take(&mut *ids.lock().await);
    let mut archived = 0;
    for n in &to_archive {
        let Some(id) = ids.get(n) else { continue };
        match call(
            &mut conn,
            hyper::Method::POST,
            &format!("/v1/contacts/{id}/archive"),
            None,
            hyper::StatusCode::OK,
        )
        .await
        {
            Ok(_) => archived += 1,
            Err(e) => {
                extra_errors += 1;
                *last_error.lock().await = Some(e);
            }
        }
    }
    if let Some(e) = last_error.lock().await.as_ref() {
        eprintln!("crm-bench scale-grow: last error: {e}");
    }
    let s = person(sample);
    println!(
        "scale-grow from={from} to={to} connections={connections} created={} errors={} \
         seconds={seconds:.2} contacts_per_s={:.0} p50_ms={:.2} p99_ms={:.2} markers={marked} \
         archived={archived} extra_errors={extra_errors} updated_since={updated_since} \
         sample_id={} sample_email={} sample_company={} cpu_s={}",
        h.len(),
        errors.load(Ordering::Relaxed),
        h.len() as f64 / seconds,
        ms(&h, 0.5),
        ms(&h, 0.99),
        ids.get(&sample).map_or("none", String::as_str),
        s["email"].as_str().unwrap_or_default(),
        company_of(sample),
        cpu_seconds()
    );
    Ok(())
}

/// The company of contact `n` (`company=` reads one that exists), with `_` for spaces
/// so that it fits a `key=value` field.
fn company_of(n: u64) -> String {
    person(n)["company"]
        .as_str()
        .unwrap_or_default()
        .replace(' ', "_")
}

#[derive(Args)]
pub struct ReadArgs {
    #[command(flatten)]
    target: Target,
    /// e.g. /v1/contacts
    #[arg(long)]
    path: String,
    /// A query parameter, `key=value` (the value is percent-encoded here); repeatable.
    #[arg(long = "param")]
    params: Vec<String>,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    #[arg(long, default_value_t = 200)]
    requests: u64,
}

/// `path` with `params` (`key=value` each) as its query string, form-encoded as the
/// service decodes it.
fn with_query(path: &str, params: &[String]) -> anyhow::Result<String> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--param {p}: expected key=value"))?;
        query.append_pair(k, v);
    }
    let query = query.finish();
    Ok(if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    })
}

/// How many entries the page holds (`items` of a list, `events` of a history; 1 for
/// a single contact).
fn entries(v: &Value) -> usize {
    ["items", "events"]
        .iter()
        .find_map(|k| v[*k].as_array().map(Vec::len))
        .unwrap_or(usize::from(v.is_object()))
}

pub async fn read(a: ReadArgs) -> anyhow::Result<()> {
    let path = with_query(&a.path, &a.params)?;
    let mut conn = Conn::new(&a.target)?;
    let mut h = histogram();
    let (mut errors, mut first_error, mut items) = (0u64, None::<String>, None::<usize>);
    for i in 0..a.warmup + a.requests {
        let t0 = Instant::now();
        let result = conn.send(hyper::Method::GET, &path, None).await;
        let took = t0.elapsed().as_micros() as u64;
        match result {
            Ok((hyper::StatusCode::OK, bytes)) => {
                if i >= a.warmup {
                    h.record(took)?;
                }
                if items.is_none() {
                    items = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .map(|v| entries(&v));
                }
            }
            Ok((status, _)) => {
                errors += 1;
                first_error.get_or_insert_with(|| status.as_u16().to_string());
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| {
                    eprintln!("crm-bench read: {e}");
                    "io".to_owned()
                });
            }
        }
    }
    let (p50, p95, max) = if h.is_empty() {
        ("na".to_owned(), "na".to_owned(), "na".to_owned())
    } else {
        (
            format!("{:.2}", ms(&h, 0.5)),
            format!("{:.2}", ms(&h, 0.95)),
            format!("{:.2}", h.max() as f64 / 1000.0),
        )
    };
    println!(
        "read sent={} measured={} errors={errors} first_error={} items={} p50_ms={p50} \
         p95_ms={p95} max_ms={max} cpu_s={}",
        a.warmup + a.requests,
        h.len(),
        first_error.as_deref().unwrap_or("none"),
        items.map_or_else(|| "na".to_owned(), |n| n.to_string()),
        cpu_seconds()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rare_word_is_rare_and_the_common_term_common() {
        let search = |n: u64| {
            let v = person(n);
            ["given_name", "family_name", "email", "company"]
                .iter()
                .map(|k| v[*k].as_str().unwrap().to_lowercase())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let texts: Vec<String> = (0..20_000).map(search).collect();
        assert!(!texts.iter().any(|t| t.contains(RARE_WORD)));
        let common = texts.iter().filter(|t| t.contains("son")).count();
        assert!((1_000..8_000).contains(&common), "{common}");
        assert!(search(7) != search(8));
        assert_eq!(person(42), person(42));
    }

    #[test]
    fn encodes_query_values() {
        let path = with_query(
            "/v1/x",
            &[
                "q=a b+c:d@e".into(),
                "as_of=2026-01-01T00:00:00+01:00".into(),
            ],
        )
        .unwrap();
        let (p, query) = path.split_once('?').unwrap();
        assert_eq!(p, "/v1/x");
        let decoded: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(
            decoded,
            [
                ("q".into(), "a b+c:d@e".into()),
                ("as_of".into(), "2026-01-01T00:00:00+01:00".into())
            ]
        );
        assert_eq!(with_query("/v1/x", &[]).unwrap(), "/v1/x");
        assert!(with_query("/v1/x", &["novalue".into()]).is_err());
    }
}
