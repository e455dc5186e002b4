//! The preference center (docs/rights.md): its links (expired, revoked, another
//! contact's, another organisation's), the erasure it asks for (confirmed by a mailed
//! link), and the page itself in Debian's real headless Chromium through WebDriver,
//! with JavaScript on and off, screenshots kept in target/test-output.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crm_tests::harness::{eventually, Options, TestApp};
use crm_tests::sinks::SmtpSink;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

async fn link(app: &TestApp, token: &str, contact: Uuid) -> String {
    let (s, v) = app
        .call_as(
            token,
            Method::POST,
            &format!("/v1/contacts/{contact}/preference-link"),
            None,
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(
        v["url"]
            .as_str()
            .unwrap()
            .contains("/preferences?token=pc_"),
        "{v}"
    );
    v["token"].as_str().unwrap().to_owned()
}

async fn page(app: &TestApp, token: &str) -> (u16, String) {
    let r = app
        .http
        .get(app.url(&format!("/preferences?token={token}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// Submits the page's form as a browser without JavaScript would: (status, Location).
async fn submit(app: &TestApp, token: &str, form: &[(&str, &str)]) -> (u16, String) {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url(&format!("/preferences?token={token}")))
        .header("user-agent", "PreferenceTest/1.0")
        .form(form)
        .send()
        .await
        .unwrap();
    let location = r
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status().as_u16(), location)
}

/// The names of the boxes a page has ticked: what a browser submits for them.
fn ticked(html: &str) -> Vec<String> {
    html.split("<input type=\"checkbox\"")
        .skip(1)
        .filter_map(|input| {
            let tag = input.split('>').next()?;
            tag.contains(" checked")
                .then(|| {
                    tag.split("name=\"")
                        .nth(1)?
                        .split('"')
                        .next()
                        .map(str::to_owned)
                })
                .flatten()
        })
        .collect()
}

/// The contact's ConsentLog, oldest first, once it holds at least `n` entries.
async fn log_of(app: &TestApp, contact: Uuid, n: usize) -> Vec<Value> {
    eventually(Duration::from_secs(5), || async {
        let entries = log(app, contact).await;
        (entries.len() >= n).then_some(entries)
    })
    .await
    .unwrap_or_else(|| panic!("fewer than {n} entries"))
}

/// The contact's ConsentLog, oldest first.
async fn log(app: &TestApp, contact: Uuid) -> Vec<Value> {
    let (s, v) = app
        .call_as(
            &app.token,
            Method::GET,
            &format!("/v1/consent/log?contact_id={contact}&limit=500"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut items = v["items"].as_array().unwrap().clone();
    items.reverse();
    items
}

#[tokio::test]
async fn a_link_opens_its_own_contact_only_until_it_expires_or_is_revoked() {
    let app = TestApp::spawn().await;
    let (a, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada.pc@example.com"}))
        .await;
    let (b, _) = app
        .create_contact(&json!({"given_name": "Bea", "email": "bea.pc@example.com"}))
        .await;
    // The organisation's colour and logo head the page; a light colour gets dark text.
    let (s, v) = app
        .call_as(
            &app.token,
            Method::PUT,
            "/v1/privacy/branding",
            Some(json!({"colour": "blue", "reason": "brand"})),
        )
        .await;
    assert_eq!(
        (s, v["fields"][0]["field"].as_str()),
        (422, Some("colour")),
        "{v}"
    );
    let logo = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";
    let (s, v) = app
        .call_as(
            &app.token,
            Method::PUT,
            "/v1/privacy/branding",
            Some(json!({"colour": "#FFD700", "logo": logo, "reason": "brand"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let token = link(&app, &app.token, a).await;
    let (s, html) = page(&app, &token).await;
    assert_eq!(s, 200, "{html}");
    assert!(
        html.contains("--accent: #ffd700; --on-accent: #000000")
            && html.contains(&format!("<img src=\"{logo}\"")),
        "the organisation's branding"
    );
    assert!(
        html.contains("<fieldset>") && html.contains("<label for="),
        "{html}"
    );

    // What a link changes is its own contact's consent, never another's. The form as
    // a browser sends it: the boxes ticked already (the service purpose: its basis is
    // a contract), and the one ticked now.
    let mut form: Vec<(String, String)> = ticked(&html)
        .into_iter()
        .map(|n| (n, "on".to_owned()))
        .collect();
    assert!(
        !form.is_empty() && !form.iter().any(|(n, _)| n == "marketing.email"),
        "{form:?}"
    );
    form.push(("marketing.email".into(), "on".into()));
    form.push(("action".into(), "save".into()));
    let form: Vec<(&str, &str)> = form.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let (s, location) = submit(&app, &token, &form).await;
    assert_eq!(
        (s, location.ends_with("&done=saved")),
        (303, true),
        "{location}"
    );
    let mine = log_of(&app, a, 1).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(
        (mine[0]["status"].as_str(), mine[0]["source"].as_str()),
        (Some("granted"), Some("preference_center"))
    );
    assert!(log(&app, b).await.is_empty());

    // Another organisation's staff cannot issue a link to this organisation's contact.
    let (_, _, other) = app.another_org("Elsewhere").await;
    let (s, _) = app
        .call_as(
            &other,
            Method::POST,
            &format!("/v1/contacts/{a}/preference-link"),
            None,
        )
        .await;
    assert_eq!(s, 404);

    // Unknown, revoked, expired.
    let (s, html) = page(&app, "pc_not-a-token").await;
    assert_eq!(s, 404);
    assert!(html.contains("not valid"), "{html}");
    let (s, v) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/contacts/{a}/preference-link/revoke"),
            None,
        )
        .await;
    assert_eq!((s, v["revoked"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(page(&app, &token).await.0, 404);
    let (s, _) = submit(&app, &token, &[("action", "opt_out_all")]).await;
    assert_eq!(s, 404, "a revoked link changes nothing");
    let fresh = link(&app, &app.token, a).await;
    app.db()
        .await
        .execute(
            "UPDATE preference_tokens SET expires_at = now() - interval '1 minute' \
             WHERE org_id = $1 AND revoked_at IS NULL",
            &[&app.org_id],
        )
        .await
        .unwrap();
    let (s, html) = page(&app, &fresh).await;
    assert_eq!(s, 410);
    assert!(html.contains("expired"), "{html}");
    // Only its digest was stored.
    let stored: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM preference_tokens WHERE token_sha256 = $1 OR token_sha256 = $2",
            &[&fresh, &token],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    assert_eq!(
        log(&app, a).await.len(),
        1,
        "nothing changed since the save"
    );
    app.stop().await;
}

#[tokio::test]
async fn opting_out_of_everything_honours_gpc_and_an_erasure_needs_the_mailed_link() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        ..Default::default()
    })
    .await;
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let (c, _) = app
        .create_contact(&json!({"given_name": "Cy", "email": email}))
        .await;
    let token = link(&app, &app.token, c).await;

    // Opting out of everything: a withdrawal of every purpose on every channel, the
    // CCPA opt-out too when the browser sends Sec-GPC: 1.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url(&format!("/preferences?token={token}&lang=de")))
        .header("sec-gpc", "1")
        .form(&[("action", "opt_out_all")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // Every purpose on each of its channels (three purposes by default), and the
    // CCPA opt-out.
    let entries = eventually(Duration::from_secs(5), || async {
        let entries = log(&app, c).await;
        entries
            .iter()
            .any(|e| e["action"] == "SaleOrSharingOptedOut")
            .then_some(entries)
    })
    .await
    .expect("the GPC opt-out reached the ConsentLog");
    let withdrawn = entries
        .iter()
        .filter(|e| e["status"] == "withdrawn")
        .count();
    assert!(withdrawn >= 5, "{entries:?}");
    assert!(
        entries.iter().all(|e| e["source"] == "preference_center"),
        "{entries:?}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "SaleOrSharingOptedOut"),
        "{entries:?}"
    );
    let (_, html) = page(&app, &format!("{token}&lang=de&done=opted_out")).await;
    assert!(
        html.contains("lang=\"de\"") && html.contains("widersprochen"),
        "{html}"
    );

    // Asking for erasure erases nothing yet: a link goes to the address on file.
    let (s, location) = submit(&app, &token, &[("action", "erase")]).await;
    assert_eq!(
        (s, location.ends_with("&done=erase_sent")),
        (303, true),
        "{location}"
    );
    let mail = eventually(Duration::from_secs(10), || async {
        sink.messages()
            .into_iter()
            .find(|m| m.to.iter().any(|t| t == &email))
    })
    .await
    .expect("the confirmation mail reached the sink");
    let text = mail.raw.replace("=\r\n", "").replace("=3D", "=");
    let confirm = text
        .split("/preferences/erase?token=")
        .nth(1)
        .and_then(|t| t.split('&').next())
        .expect("a confirmation link")
        .trim()
        .to_owned();
    let (s, v) = app
        .call_as(&app.token, Method::GET, &format!("/v1/contacts/{c}"), None)
        .await;
    assert_eq!((s, v["erased_at"].is_null()), (200, true), "{v}");
    // Opening the link asks; only the form's POST erases, once.
    let r = app
        .http
        .get(app.url(&format!("/preferences/erase?token={confirm}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .post(app.url(&format!("/preferences/erase?token={confirm}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("erased"));
    let r = app
        .http
        .post(app.url(&format!("/preferences/erase?token={confirm}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the link works once");
    let receipt = eventually(Duration::from_secs(5), || async {
        let (_, v) = app
            .call_as(
                &app.token,
                Method::GET,
                &format!("/v1/erasures?contact_id={c}"),
                None,
            )
            .await;
        v["items"].get(0).cloned()
    })
    .await
    .expect("a receipt");
    assert_eq!(receipt["source"], "preference_center");
    assert_eq!(
        page(&app, &token).await.0,
        404,
        "the contact's links died with it"
    );
    app.stop().await;
}

/// A chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child =
            Command::new(std::env::var("CRM_CHROMEDRIVER").unwrap_or("chromedriver".into()))
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver (Debian's chromium-driver; scripts/test installs it)");
        Self { child, port }
    }

    async fn client(&self, javascript: bool) -> Client {
        let mut prefs = json!({});
        if !javascript {
            prefs["profile.managed_default_content_settings.javascript"] = json!(2);
        }
        let caps = json!({
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1000,1400"],
                "prefs": prefs,
            }
        });
        let caps = caps.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{}", self.port);
        for _ in 0..100 {
            // chromedriver listens on plain HTTP on this machine: no TLS needed.
            if let Ok(c) = ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not answer on {url}");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-output/preference-center");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_page_works_in_a_real_chromium_with_and_without_javascript() {
    let app = TestApp::spawn().await;
    let driver = Driver::start();
    for javascript in [true, false] {
        let name = if javascript { "js-on" } else { "js-off" };
        let (c, _) = app
            .create_contact(&json!({"given_name": "Ines", "email": format!("{name}@example.com")}))
            .await;
        let token = link(&app, &app.token, c).await;
        let browser = driver.client(javascript).await;
        browser
            .goto(&app.url(&format!("/preferences?token={token}")))
            .await
            .unwrap();
        let title = browser.title().await.unwrap();
        assert!(title.contains("communication preferences"), "{title}");
        let png = browser.screenshot().await.unwrap();
        std::fs::write(screenshots().join(format!("{name}-before.png")), png).unwrap();
        // Every box has its label; tick "Marketing / E-mail" by its label, as a
        // person would, and save.
        let checkbox = browser.find(Locator::Id("marketing.email")).await.unwrap();
        assert_eq!(
            checkbox.prop("checked").await.unwrap().as_deref(),
            Some("false")
        );
        browser
            .find(Locator::Css("label[for='marketing.email']"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        browser
            .find(Locator::Id("save"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let found = browser
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("notice"))
            .await;
        let notice = match found {
            Ok(n) => n,
            Err(e) => panic!(
                "{e} at {:?}; log: {:?}",
                browser.current_url().await.map(|u| u.to_string()),
                log(&app, c).await
            ),
        };
        let notice = notice.text().await.unwrap();
        assert!(notice.contains("saved"), "{notice}");
        let checked = browser
            .find(Locator::Id("marketing.email"))
            .await
            .unwrap()
            .prop("checked")
            .await
            .unwrap();
        assert_eq!(checked.as_deref(), Some("true"));
        let png = browser.screenshot().await.unwrap();
        std::fs::write(screenshots().join(format!("{name}-after.png")), png).unwrap();
        browser.close().await.unwrap();

        // The change is in the ConsentLog over the API, from the browser.
        let entries = log_of(&app, c, 1).await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        let e = &entries[0];
        assert_eq!(
            (
                e["status"].as_str(),
                e["channel"].as_str(),
                e["purpose"].as_str()
            ),
            (Some("granted"), Some("email"), Some("marketing"))
        );
        assert_eq!(e["source"], "preference_center");
        assert!(
            e["user_agent"].as_str().unwrap_or("").contains("Chrome"),
            "{e}"
        );
        assert!(e["ip"].as_str().is_some(), "{e}");
    }
    app.stop().await;
}
