//! `TestApp::spawn()` gives each test its own database (migrated), its own JetStream
//! stream and subject prefix, and the service listening on a free port, with an
//! organisation and a staff user whose token is ready to use.
//!
//! The servers come from `DATABASE_URL` (a superuser URL; default the local server) and
//! `NATS_URL` (default nats://127.0.0.1:4222), as `scripts/test` sets them.

use std::time::Duration;

use base64::Engine;
use crm_api::config::{HttpSettings, JwtSettings, Settings};
use crm_api::startup::Application;
use crm_api::state::AppState;
use crm_domain::metadata::EventMetadata;
use crm_domain::user::{Grantor, Role, RoleRef};
use crm_domain::values::{Email, Name};
use crm_infra::settings::{DatabaseSettings, KeySettings, NatsSettings};
use secrecy::SecretString;
use serde_json::Value;
use tokio_postgres::NoTls;
use uuid::Uuid;

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let cut = base
        .rfind('/')
        .filter(|i| base[..*i].contains("//") && *i > base.find("//").unwrap() + 1);
    match cut {
        Some(i) => format!("{}/{db}{query}", &base[..i]),
        None => format!("{base}/{db}{query}"),
    }
}

/// Connects with a plain client (spawning its connection).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// nats-server 2.9 (Debian's) removes an account's JetStream directory when its last
/// file stream is deleted; a stream created at that moment fails ("could not create
/// storage directory", error 10049). Tests create and delete streams in parallel, so a
/// small stream that is never deleted keeps that directory in place.
pub async fn ensure_anchor_stream() {
    use async_nats::jetstream::stream::{Config, StorageType};
    let client = async_nats::connect(nats_url())
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    // Tests start in parallel: when two create the stream at once, the loser is told
    // that its subjects overlap an existing stream, which is the winner's: fine.
    let mut last = None;
    for _ in 0..10 {
        match js
            .get_or_create_stream(Config {
                name: "CRM_TEST_ANCHOR".into(),
                subjects: vec!["crm-test-anchor".into()],
                storage: StorageType::File,
                max_messages: 1,
                ..Default::default()
            })
            .await
        {
            Ok(_) => return,
            Err(e) => {
                if js.get_stream("CRM_TEST_ANCHOR").await.is_ok() {
                    return;
                }
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    panic!("create the JetStream anchor stream: {last:?}");
}

/// Options for [`TestApp::spawn_with`].
#[derive(Clone, Debug)]
pub struct Options {
    pub run_relay: bool,
    pub run_projectors: bool,
    /// The dispatcher in the process (sends queued messages).
    pub run_dispatcher: bool,
    /// How often the AI sweep runs (short in tests, so expiries show soon).
    pub ai_sweep_interval: Duration,
    /// `CRM_SMTP_URL`: where email goes without an organisation's carrier (a test's
    /// SMTP sink); unset: nowhere (messages fail with "no carrier").
    pub smtp_url: Option<String>,
    pub max_body_bytes: u64,
    /// Origins allowed for CORS (none by default, as in production).
    pub cors_origins: Vec<String>,
    /// Origins allowed for the portal's CORS (none by default).
    pub portal_cors_origins: Vec<String>,
    /// Off by default: a test's many requests all come from 127.0.0.1.
    pub rate_limits: crm_api::edge::ratelimit::RateLimitSettings,
    /// The edge's timeouts (the service's defaults unless a test shortens them).
    pub timeouts: crm_api::config::HttpTimeouts,
    /// A superuser URL of the PostgreSQL server to use (default: [`admin_url`]); a
    /// test that stops its server gives its [`PrivatePostgres`]'s.
    pub admin_url: Option<String>,
    /// The NATS server to use (default: [`nats_url`]); a test that stops its server
    /// gives its [`PrivateNats`]'s.
    pub nats_url: Option<String>,
    /// The webhook delivery worker in the process (off by default: most tests have no
    /// endpoint, and a webhook test may run its own with a controllable clock).
    pub run_deliverer: bool,
    /// The webhook settings: loopback is allowlisted (tests' receivers listen there),
    /// jitter is off and the queue is polled often.
    pub webhooks: crm_api::config::WebhookSettings,
    /// The live event stream's settings (the service's defaults unless a test changes
    /// them).
    pub live: crm_infra::live::LiveSettings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            run_relay: true,
            run_projectors: true,
            run_dispatcher: true,
            ai_sweep_interval: Duration::from_millis(300),
            smtp_url: None,
            max_body_bytes: 64 * 1024,
            cors_origins: Vec::new(),
            portal_cors_origins: Vec::new(),
            rate_limits: crm_api::edge::ratelimit::RateLimitSettings {
                api_per_sec: 0,
                auth_per_sec: 0,
                failed_logins_per_hour: 100,
            },
            timeouts: crm_api::config::HttpTimeouts::default(),
            admin_url: None,
            nats_url: None,
            run_deliverer: false,
            webhooks: crm_api::config::WebhookSettings {
                allow_nets: crm_infra::webhooks::net::NetPolicy::parse("127.0.0.0/8,::1/128")
                    .unwrap(),
                delivery: crm_infra::webhooks::worker::DeliverySettings {
                    attempt_timeout: Duration::from_secs(5),
                    jitter: false,
                    poll: Duration::from_millis(50),
                    ..Default::default()
                },
            },
            live: crm_infra::live::LiveSettings::default(),
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub state: AppState,
    pub db_name: String,
    /// Superuser URL of this test's database.
    pub db_url: String,
    pub org_id: Uuid,
    pub user_id: Uuid,
    pub token: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A second API process on a test's database (as when the API runs on several machines).
pub struct SecondApi {
    pub base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl SecondApi {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

impl TestApp {
    /// Starts another API process (no relay, no projectors) on this test's database.
    pub async fn second_api(&self) -> SecondApi {
        let mut settings = self.settings.clone();
        settings.run_relay = false;
        settings.run_projectors = false;
        let app = Application::build(settings).await.expect("second api");
        let base = format!("http://{}", app.local_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        SecondApi {
            base,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(opts: Options) -> Self {
        if std::env::var_os("CRM_LOG").is_some() {
            crm_api::telemetry::init();
        }
        ensure_anchor_stream().await;
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("crm_test_{id}");
        let server_url = opts.admin_url.clone().unwrap_or_else(admin_url);
        let admin = connect(&server_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .expect("create test database");
        let db_url = with_database(&server_url, &db_name);
        let mut kek = [0u8; 32];
        kek.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u8).wrapping_mul(31) ^ id.as_bytes()[i % id.len()]);
        let settings = Settings {
            database: DatabaseSettings {
                url: SecretString::from(db_url.clone()),
                app_role: "crm_app".into(),
                pool_size: 40,
            },
            nats: NatsSettings {
                url: opts.nats_url.clone().unwrap_or_else(nats_url),
                stream: format!("T_{id}"),
                subject_prefix: format!("t{id}.evt"),
            },
            keys: KeySettings {
                kek_id: "test".into(),
                kek: SecretString::from(base64::engine::general_purpose::STANDARD.encode(kek)),
            },
            http: HttpSettings {
                bind: "127.0.0.1:0".parse().unwrap(),
                max_body_bytes: opts.max_body_bytes,
                max_consistency_wait: Duration::from_secs(10),
                cors_origins: opts.cors_origins.clone(),
                portal_cors_origins: opts.portal_cors_origins.clone(),
                rate_limits: opts.rate_limits,
                timeouts: opts.timeouts,
            },
            mail: crm_api::config::MailSettings {
                spool_dir: None,
                link_base: "https://crm.example.com".into(),
                smtp_url: opts.smtp_url.clone().map(SecretString::from),
                from: "crm@localhost".into(),
            },
            jwt: JwtSettings {
                secret: SecretString::from(format!("test-secret-{id}")),
                ttl: Duration::from_secs(600),
                audience: "crm-api".into(),
                issuer: "crm".into(),
            },
            run_relay: opts.run_relay,
            run_projectors: opts.run_projectors,
            run_dispatcher: opts.run_dispatcher,
            ai_sweep_interval: opts.ai_sweep_interval,
            retention_sweep_interval: None,
            run_deliverer: opts.run_deliverer,
            webhooks: opts.webhooks.clone(),
            live: opts.live,
        };
        crm_infra::db::migrate(&settings.database)
            .await
            .expect("migrate");
        let app = Application::build(settings.clone())
            .await
            .expect("build application");
        let addr = app.local_addr();
        let state = app.state().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        let (org_id, user_id) =
            create_org_and_user(&state, "Acme", &format!("owner-{id}@example.com")).await;
        let token = state.tokens.issue(user_id, org_id, 0).unwrap();
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            settings,
            state,
            db_name,
            db_url,
            org_id,
            user_id,
            token,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Another organisation with its own user; returns (org, user, token).
    pub async fn another_org(&self, name: &str) -> (Uuid, Uuid, String) {
        let email = format!("{}@other.example.com", Uuid::new_v4().simple());
        let (org, user) = create_org_and_user(&self.state, name, &email).await;
        (org, user, self.state.tokens.issue(user, org, 0).unwrap())
    }

    /// A user of the test's organisation with `role`; returns (user, token).
    pub async fn user_with_role(&self, role: RoleRef) -> (Uuid, String) {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let user = create_user_with_role(&self.state, self.org_id, &email, TEST_HASH, role).await;
        (user, self.state.tokens.issue(user, self.org_id, 0).unwrap())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A request with `token` (a JWT or an API key) as the bearer: (status, JSON body or
    /// null).
    pub async fn call_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A POST without a body (archive, revoke, …) as this test's owner.
    pub async fn post_without_body(&self, path: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    pub async fn patch(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .patch(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// Creates a contact; returns (id, position of its event).
    pub async fn create_contact(&self, body: &Value) -> (Uuid, i64) {
        let r = self.post("/v1/contacts", body).await;
        assert_eq!(
            r.status(),
            201,
            "create contact: {}",
            r.text().await.unwrap()
        );
        let v: Value = r.json().await.unwrap();
        (
            v["id"].as_str().unwrap().parse().unwrap(),
            v["positions"][0].as_i64().unwrap(),
        )
    }

    /// A superuser connection to this test's database.
    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.db_url).await
    }

    /// The body of every message in this test's JetStream stream, in stream order.
    pub async fn stream_payloads(&self) -> Vec<Vec<u8>> {
        let mut stream = self
            .state
            .bus
            .jetstream
            .get_stream(&self.settings.nats.stream)
            .await
            .unwrap();
        let info = stream.info().await.unwrap();
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return out;
        }
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(m.payload.to_vec());
            }
        }
        out
    }

    /// Every event the test's JetStream stream carries, in stream order: a message is
    /// one event or a commit's events of one stream (`crm_infra::feed::bus::events_of`).
    pub async fn stream_events(&self) -> Vec<crm_infra::store::event_store::RawEvent> {
        self.stream_payloads()
            .await
            .iter()
            .flat_map(|body| crm_infra::feed::bus::events_of(body).expect("a feed message"))
            .collect()
    }

    /// A superuser pool on this test's database (for infra calls that take a pooled client).
    pub fn admin_pool(&self) -> deadpool_postgres::Pool {
        crm_infra::db::admin_pool(&DatabaseSettings {
            url: SecretString::from(self.db_url.clone()),
            app_role: String::new(),
            pool_size: 4,
        })
        .unwrap()
    }

    /// Rebuilds read model `name` now, as `crm rebuild NAME` does.
    pub async fn rebuild(&self, name: &str) -> crm_infra::feed::rebuild::RebuildReport {
        crm_infra::feed::rebuild::rebuild(
            &self.admin_pool(),
            &self.state.crypto,
            crm_infra::read_models::by_name(name).expect("a read model of that name"),
            "crm_app",
            |_, _| {},
        )
        .await
        .expect("rebuild")
    }

    /// Stops the service, deletes the stream and drops the database.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        let _ = self
            .state
            .bus
            .jetstream
            .delete_stream(&self.settings.nats.stream)
            .await;
        drop(self.state);
        let admin = connect(&with_database(&self.db_url, "postgres")).await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .await;
    }
}

/// Creates an organisation and an owner without bcrypt's cost (tests mint tokens).
pub async fn create_org_and_user(state: &AppState, org_name: &str, email: &str) -> (Uuid, Uuid) {
    let org = crm_infra::access::accounts::create_organization(
        &state.executor,
        Name::parse(org_name).unwrap(),
    )
    .await
    .unwrap();
    let user = create_user(state, org, email, TEST_HASH).await;
    (org, user)
}

/// A bcrypt hash no password matches (tests mint their tokens).
pub const TEST_HASH: &str = "$2b$04$invalidinvalidinvalidinvalidinvalidinvalidinvalidinvali";

/// Registers a staff user (owner) of `org` with the given bcrypt hash.
pub async fn create_user(state: &AppState, org: Uuid, email: &str, password_hash: &str) -> Uuid {
    create_user_with_role(
        state,
        org,
        email,
        password_hash,
        RoleRef::Builtin(Role::Owner),
    )
    .await
}

/// Registers a staff user of `org` with `role`, as the operator would.
pub async fn create_user_with_role(
    state: &AppState,
    org: Uuid,
    email: &str,
    password_hash: &str,
    role: RoleRef,
) -> Uuid {
    let user = crm_infra::access::accounts::NewUser {
        org_id: org,
        email: Email::parse(email).unwrap(),
        display_name: Name::parse("Owner").unwrap(),
        role,
        password_hash: password_hash.to_owned(),
    };
    crm_infra::access::accounts::create_user(
        &state.executor,
        &state.pool,
        user,
        Grantor::operator(),
        &EventMetadata::system(org, "test"),
    )
    .await
    .unwrap()
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A PostgreSQL server of a test's own (initdb into a temporary directory, a free port),
/// for tests that stop and start it. Binaries from `CRM_TEST_PG_BIN` (scripts/test sets
/// it), else the newest /usr/lib/postgresql/*/bin.
pub struct PrivatePostgres {
    pub dir: std::path::PathBuf,
    pub port: u16,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let bin = std::env::var_os("CRM_TEST_PG_BIN")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .filter(|p| p.join("initdb").exists())
                    .collect();
                dirs.sort();
                dirs.pop()
            })
            .expect("no PostgreSQL binaries: set CRM_TEST_PG_BIN");
        let dir = std::env::temp_dir().join(format!("crm-pg-{}", Uuid::new_v4().simple()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let _ = std::process::Command::new("chown")
                .args(["postgres:postgres", dir.to_str().unwrap()])
                .status();
        }
        let data = dir.join("data");
        let out = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )
        .output()
        .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self { dir, port, bin };
        pg.start_server();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let data = self.dir.join("data");
        let mut all = vec!["-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        as_postgres(&self.bin.join("pg_ctl"), &all)
            .output()
            .expect("run pg_ctl")
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let out = self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (fast: sessions are ended).
    pub fn stop_server(&self) {
        let out = self.pg_ctl(&["-w", "-m", "fast", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `program args`, as the `postgres` user when this process is root (initdb and
/// postgres refuse to run as root).
fn as_postgres(program: &std::path::Path, args: &[&str]) -> std::process::Command {
    if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = std::process::Command::new(program);
        c.args(args);
        c
    }
}

/// Whether this process runs as root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A nats-server of a test's own with JetStream on disk (a temporary directory, a free
/// port), for tests that kill and restart it. The binary is `nats-server` on PATH.
pub struct PrivateNats {
    pub dir: std::path::PathBuf,
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("crm-nats-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Self {
            dir,
            port,
            child: None,
        };
        n.start_server();
        n
    }

    /// Starts the server (on the same port and store) and waits until it accepts.
    pub fn start_server(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server (is it on PATH?)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL).
    pub fn kill_server(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
