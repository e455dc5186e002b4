//! The preference center: a public page at a token link (no login) where a contact sees
//! its channels and purposes in plain language and changes them, opts out of
//! everything, downloads a copy of its data, or asks for its erasure (confirmed by a
//! link sent to its e-mail address on file). Server-rendered HTML (askama templates in
//! `api/templates/`), no script and no external asset, under a strict CSP; English and
//! German ([`TEXTS`]). Every change is an event with source `preference_center` and the
//! request's IP and user agent; opting out takes the same path as the RFC 8058 link
//! (`consent::opt_out`). See docs/rights.md, "Preference center".

use std::collections::BTreeMap;

use askama::Template;
use chrono::Utc;
use crm_domain::access::{builtin_policy, Role};
use crm_domain::consent::gate::ConsentState;
use crm_domain::consent::ledger::{Choice, ConsentCommand};
use crm_domain::consent::privacy::{PrivacySettings, DATA_SUBJECT_REQUEST};
use crm_domain::consent::proof::{CaptureSource, ConsentProof, Notice as ProofNotice, NoticeHash};
use crm_domain::consent::{Channel, ConsentStatus, LawfulBasis, PurposeKey};
use crm_domain::contact::RequestSource;
use crm_domain::message::Content;
use crm_domain::organization::Organization;
use crm_domain::values::Line;
use crm_infra::consent::state::{self, Presence};
use crm_infra::consent::{ledger, privacy};
use crm_infra::rights::preferences::{self as links, Link};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use warp::http::{HeaderValue, StatusCode};
use warp::Reply;

use super::consent::{contact_metadata, honour_gpc, opt_out, rules};
use super::Authed;
use crate::edge::context::RequestContext;
use crate::edge::extract::{Form, Id, Query};
use crate::edge::reply::{Created, Ok200};
use crate::edge::reply::{RawAs, RawDoc};
use crate::edge::route::OpDoc;
use crate::error::ApiError;
use crate::state::AppState;

/// Every string of the pages, per language: one place to translate.
pub(crate) struct Texts {
    title: &'static str,
    intro: &'static str,
    save: &'static str,
    opt_out_all: &'static str,
    saved: &'static str,
    opted_out: &'static str,
    copy_title: &'static str,
    copy_text: &'static str,
    copy_link: &'static str,
    erase_title: &'static str,
    erase_text: &'static str,
    erase_button: &'static str,
    erase_sent: &'static str,
    erase_no_address: &'static str,
    erase_not_sent: &'static str,
    erase_confirm_heading: &'static str,
    erase_confirm_text: &'static str,
    erase_confirm_button: &'static str,
    erased_heading: &'static str,
    erased_text: &'static str,
    link_unknown: &'static str,
    link_expired: &'static str,
    channels: [(Channel, &'static str); 5],
}

/// The languages of the pages: English (the default) and German.
pub(crate) const TEXTS: [(&str, Texts); 2] = [
    (
        "en",
        Texts {
            title: "Your communication preferences",
            intro: "Choose what we may send you, and how. A box that is ticked means yes.",
            save: "Save my choices",
            opt_out_all: "Opt out of everything",
            saved: "Your choices are saved.",
            opted_out: "You are opted out of everything. Nothing more will be sent to you, except what the law requires.",
            copy_title: "A copy of your data",
            copy_text: "Download everything we hold about you, as a JSON file.",
            copy_link: "Download my data",
            erase_title: "Erase your data",
            erase_text: "Ask us to erase everything we hold about you. We send a link to your e-mail address on file to confirm it is you.",
            erase_button: "Ask to erase my data",
            erase_sent: "We sent a confirmation link to your e-mail address on file. Nothing is erased until you open it and confirm.",
            erase_no_address: "We hold no e-mail address to confirm an erasure with. Please contact us.",
            erase_not_sent: "We may not send to your e-mail address on file, so we could not send the confirmation link. Please contact us.",
            erase_confirm_heading: "Erase your data",
            erase_confirm_text: "This erases everything we hold about you, for good. It cannot be undone.",
            erase_confirm_button: "Erase my data now",
            erased_heading: "Your data is erased",
            erased_text: "Everything we held about you is erased. Receipt",
            link_unknown: "This link is not valid. Ask us for a new one.",
            link_expired: "This link has expired. Ask us for a new one.",
            channels: [
                (Channel::Email, "E-mail"),
                (Channel::Sms, "Text messages (SMS)"),
                (Channel::Whatsapp, "WhatsApp"),
                (Channel::Phone, "Phone calls"),
                (Channel::Postal, "Post"),
            ],
        },
    ),
    (
        "de",
        Texts {
            title: "Ihre Kommunikationseinstellungen",
            intro: "Wählen Sie, was wir Ihnen senden dürfen und auf welchem Weg. Ein Häkchen bedeutet Ja.",
            save: "Auswahl speichern",
            opt_out_all: "Allem widersprechen",
            saved: "Ihre Auswahl ist gespeichert.",
            opted_out: "Sie haben allem widersprochen. Sie erhalten nichts mehr von uns, außer was das Gesetz verlangt.",
            copy_title: "Eine Kopie Ihrer Daten",
            copy_text: "Laden Sie alles herunter, was wir über Sie speichern, als JSON-Datei.",
            copy_link: "Meine Daten herunterladen",
            erase_title: "Ihre Daten löschen",
            erase_text: "Bitten Sie uns, alles zu löschen, was wir über Sie speichern. Zur Bestätigung senden wir einen Link an Ihre hinterlegte E-Mail-Adresse.",
            erase_button: "Löschung meiner Daten beantragen",
            erase_sent: "Wir haben einen Bestätigungslink an Ihre hinterlegte E-Mail-Adresse gesendet. Gelöscht wird erst, wenn Sie ihn öffnen und bestätigen.",
            erase_no_address: "Wir haben keine E-Mail-Adresse, mit der wir eine Löschung bestätigen können. Bitte wenden Sie sich an uns.",
            erase_not_sent: "An Ihre hinterlegte E-Mail-Adresse dürfen wir nichts senden, daher konnten wir keinen Bestätigungslink schicken. Bitte wenden Sie sich an uns.",
            erase_confirm_heading: "Ihre Daten löschen",
            erase_confirm_text: "Damit wird alles, was wir über Sie speichern, endgültig gelöscht. Das lässt sich nicht rückgängig machen.",
            erase_confirm_button: "Meine Daten jetzt löschen",
            erased_heading: "Ihre Daten sind gelöscht",
            erased_text: "Alles, was wir über Sie gespeichert hatten, ist gelöscht. Beleg",
            link_unknown: "Dieser Link ist ungültig. Bitten Sie uns um einen neuen.",
            link_expired: "Dieser Link ist abgelaufen. Bitten Sie uns um einen neuen.",
            channels: [
                (Channel::Email, "E-Mail"),
                (Channel::Sms, "SMS"),
                (Channel::Whatsapp, "WhatsApp"),
                (Channel::Phone, "Anrufe"),
                (Channel::Postal, "Post"),
            ],
        },
    ),
];

/// The texts of `lang` (English when it has none).
pub(crate) fn texts(lang: Option<&str>) -> (&'static str, &'static Texts) {
    let (code, t) = TEXTS
        .iter()
        .find(|(code, _)| Some(*code) == lang)
        .unwrap_or(&TEXTS[0]);
    (code, t)
}

impl Texts {
    fn channel(&self, c: Channel) -> &'static str {
        self.channels
            .iter()
            .find(|(ch, _)| *ch == c)
            .map_or("", |(_, l)| l)
    }
}

/// The accent colour of the pages (the organisation's may replace it).
const ACCENT: &str = "#0b3d91";

struct ChannelChoice {
    id: String,
    label: &'static str,
    checked: bool,
}

struct PurposeChoices {
    key: String,
    name: String,
    description: String,
    channels: Vec<ChannelChoice>,
}

#[derive(Template)]
#[template(path = "preferences.html")]
struct Page<'a> {
    lang: &'static str,
    t: &'static Texts,
    org_name: String,
    logo: Option<String>,
    accent: String,
    /// The text colour that reads on `accent`.
    on_accent: &'static str,
    nonce: String,
    token: &'a str,
    note: Option<&'static str>,
    purposes: Vec<PurposeChoices>,
}

#[derive(Template)]
#[template(path = "notice.html")]
struct Notice<'a> {
    lang: &'static str,
    org_name: String,
    accent: String,
    on_accent: &'static str,
    nonce: String,
    heading: &'a str,
    text: String,
    form_action: Option<String>,
    button: &'a str,
}

/// The HTML answer of a page, with the headers every page carries: a CSP that allows
/// nothing but the page's own inline style (by nonce) and form posts to itself.
fn html(status: StatusCode, body: String, nonce: &str) -> warp::reply::Response {
    let mut r = warp::reply::with_status(warp::reply::html(body), status).into_response();
    let h = r.headers_mut();
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; img-src data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert("content-security-policy", v);
    }
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Black or white, whichever contrasts more with `#rrggbb` (WCAG relative luminance).
fn on(colour: &str) -> &'static str {
    let channel = |i: usize| {
        let v = u8::from_str_radix(colour.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0);
        let c = f64::from(v) / 255.0;
        if c <= 0.03928 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5);
    // Contrast with white (1.05 / (l + 0.05)) against black ((l + 0.05) / 0.05).
    if 1.05 / (l + 0.05) >= (l + 0.05) / 0.05 {
        "#ffffff"
    } else {
        "#000000"
    }
}

fn nonce() -> String {
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

/// A page that says one thing (a bad link, a done erasure), in `status`.
fn notice_page(
    status: StatusCode,
    lang: &'static str,
    org_name: String,
    heading: &str,
    text: String,
    form: Option<(String, &str)>,
) -> Result<warp::reply::Response, ApiError> {
    let n = nonce();
    let (form_action, button) = match form {
        Some((action, button)) => (Some(action), button),
        None => (None, ""),
    };
    let page = Notice {
        lang,
        org_name,
        accent: ACCENT.to_owned(),
        on_accent: "#ffffff",
        nonce: n.clone(),
        heading,
        text,
        form_action,
        button,
    };
    Ok(html(status, page.render().map_err(ApiError::internal)?, &n))
}

/// `GET /preferences` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// The token of the contact's link.
    #[param(pattern = "@no_nul")]
    token: String,
    /// `en` (default) or `de`.
    #[param(pattern = "@no_nul")]
    lang: Option<String>,
    /// What the last submission did (`saved`, `opted_out`, `erase_sent`,
    /// `erase_no_address`): shown once.
    #[param(pattern = "@no_nul")]
    done: Option<String>,
}

/// `POST /preferences` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TokenQuery {
    /// The token of the link.
    #[param(pattern = "@no_nul")]
    token: String,
    /// `en` (default) or `de`.
    #[param(pattern = "@no_nul")]
    lang: Option<String>,
}

/// What the form submits: `action`, and a ticked box per (purpose, channel) the
/// contact says yes to, named `<purpose>.<channel>` with the value `on`.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PreferenceForm {
    action: FormAction,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    choices: BTreeMap<String, String>,
}

/// `save` the boxes as they are, `opt_out_all` of every purpose on every channel, or
/// ask to `erase` (a confirmation link goes to the e-mail address on file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FormAction {
    Save,
    OptOutAll,
    Erase,
}

/// The pages' answers in the document: HTML.
pub(crate) struct HtmlPage;

impl RawDoc for HtmlPage {
    fn document(doc: &mut OpDoc) {
        let text = || {
            utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .build(),
            ))
        };
        doc.success(200, "The page (HTML)", Some(("text/html", text())));
        doc.success(
            303,
            "Done: see the page again, with what was done (`Location`)",
            None,
        );
        doc.success(
            404,
            "The link is unknown or revoked (an HTML page)",
            Some(("text/html", text())),
        );
        doc.success(
            410,
            "The link has expired (an HTML page)",
            Some(("text/html", text())),
        );
    }
}

/// The contact's own export in the document: the JSON document, or the page of a bad
/// link.
pub(crate) struct OwnExport;

impl RawDoc for OwnExport {
    fn document(doc: &mut OpDoc) {
        super::rights::ExportDocument::document(doc);
        let mut pages = OpDoc::default();
        HtmlPage::document(&mut pages);
        for status in [404, 410] {
            if let Some(r) = pages.responses.remove(&status) {
                doc.responses.insert(status, r);
            }
        }
    }
}

/// The contact a preference link opens, or the page that says why it does not.
async fn opened(
    s: &AppState,
    token: &str,
    lang: &'static str,
) -> Result<Result<(Uuid, Uuid), warp::reply::Response>, ApiError> {
    let t = texts(Some(lang)).1;
    let link = {
        let client = s.pool.get().await?;
        links::find(&client, token, Utc::now()).await?
    };
    let (status, text) = match link {
        Link::Open { org_id, contact_id } => {
            let client = s.pool.get().await?;
            match state::contact_presence(&s.executor, &client, org_id, contact_id).await? {
                Presence::Live => return Ok(Ok((org_id, contact_id))),
                _ => (StatusCode::NOT_FOUND, t.link_unknown),
            }
        }
        Link::Expired => (StatusCode::GONE, t.link_expired),
        Link::Revoked | Link::Unknown => (StatusCode::NOT_FOUND, t.link_unknown),
    };
    let page = notice_page(status, lang, String::new(), t.title, text.to_owned(), None)?;
    Ok(Err(page))
}

/// The organisation's name, as its stream has it.
async fn org_name(s: &AppState, org_id: Uuid) -> Result<String, ApiError> {
    let client = s.pool.get().await?;
    let org = s
        .executor
        .load::<Organization>(&client, org_id, &org_id.to_string())
        .await?;
    Ok(org
        .aggregate
        .name
        .map(|n| n.to_string())
        .unwrap_or_default())
}

/// Whether the contact's state says yes to `purpose` on `channel` (for the whole
/// channel): a grant; or, for a purpose not based on consent, no objection.
fn says_yes(state: &ConsentState, basis: LawfulBasis, purpose: &PurposeKey, c: Channel) -> bool {
    let record = state
        .records
        .iter()
        .find(|r| r.channel == c && &r.purpose == purpose && r.contact_point.is_none());
    match record.map(|r| r.status) {
        Some(ConsentStatus::Granted) => true,
        Some(_) => false,
        None => basis != LawfulBasis::Consent,
    }
}

/// The choices the page shows: every purpose in force, on each of its channels.
fn choices(settings: &PrivacySettings, state: &ConsentState, t: &Texts) -> Vec<PurposeChoices> {
    settings
        .purposes
        .iter()
        .filter(|d| !d.purpose.retired)
        .map(|d| PurposeChoices {
            key: d.purpose.key.to_string(),
            name: d.name.clone(),
            description: d.description.clone(),
            channels: d
                .purpose
                .channels
                .iter()
                .map(|c| ChannelChoice {
                    id: format!("{}.{}", d.purpose.key, c.name()),
                    label: t.channel(*c),
                    checked: says_yes(state, d.purpose.default_basis, &d.purpose.key, *c),
                })
                .collect(),
        })
        .collect()
}

/// The page's plain-language text of a purpose: what the contact saw when it said yes
/// (its SHA-256 is the grant's notice).
fn notice_text(settings: &PrivacySettings, purpose: &PurposeKey) -> String {
    settings
        .purpose(purpose)
        .map(|d| format!("{}: {}", d.name, d.description))
        .unwrap_or_default()
}

/// The consent state the page shows (the contact's streams, not a read model: a
/// change is on the page the moment it is saved).
async fn consent_now(
    s: &AppState,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<ConsentState, ApiError> {
    let client = s.pool.get().await?;
    Ok(state::consent_state(&s.executor, &client, org_id, contact_id, None).await?)
}

/// `GET /preferences?token=`: the contact's page.
pub(crate) async fn page(
    s: AppState,
    ctx: RequestContext,
    Query(q): Query<PageQuery>,
) -> Result<RawAs<HtmlPage>, ApiError> {
    let (lang, t) = texts(q.lang.as_deref());
    let (org_id, contact_id) = match opened(&s, &q.token, lang).await? {
        Ok(found) => found,
        Err(page) => return Ok(RawAs::new(page)),
    };
    // The browser's Global Privacy Control signal is the contact's opt-out of sale and
    // sharing, recorded the first time it is seen.
    let meta = contact_metadata(&ctx, org_id, contact_id);
    honour_gpc(
        &s,
        &ctx,
        org_id,
        contact_id,
        CaptureSource::PreferenceCenter,
        &meta,
    )
    .await?;
    let settings = {
        let client = s.pool.get().await?;
        privacy::load(&client, org_id).await?
    };
    let consent = consent_now(&s, org_id, contact_id).await?;
    let note = match q.done.as_deref() {
        Some("saved") => Some(t.saved),
        Some("opted_out") => Some(t.opted_out),
        Some("erase_sent") => Some(t.erase_sent),
        Some("erase_no_address") => Some(t.erase_no_address),
        Some("erase_not_sent") => Some(t.erase_not_sent),
        _ => None,
    };
    let n = nonce();
    let accent = settings
        .branding
        .colour
        .clone()
        .unwrap_or_else(|| ACCENT.to_owned());
    let body = Page {
        lang,
        t,
        org_name: org_name(&s, org_id).await?,
        logo: settings.branding.logo.clone(),
        on_accent: on(&accent),
        accent,
        nonce: n.clone(),
        token: &q.token,
        note,
        purposes: choices(&settings, &consent, t),
    }
    .render()
    .map_err(ApiError::internal)?;
    Ok(RawAs::new(html(StatusCode::OK, body, &n)))
}

fn see_other(location: String) -> warp::reply::Response {
    let mut r = warp::reply::with_status(warp::reply(), StatusCode::SEE_OTHER).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert("location", v);
    }
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

/// `POST /preferences?token=`: saves the boxes, opts out of everything, or asks for an
/// erasure; then shows the page again (303).
pub(crate) async fn submit(
    s: AppState,
    ctx: RequestContext,
    Query(q): Query<TokenQuery>,
    Form(form): Form<PreferenceForm>,
) -> Result<RawAs<HtmlPage>, ApiError> {
    let (lang, _) = texts(q.lang.as_deref());
    let (org_id, contact_id) = match opened(&s, &q.token, lang).await? {
        Ok(found) => found,
        Err(page) => return Ok(RawAs::new(page)),
    };
    let meta = contact_metadata(&ctx, org_id, contact_id);
    let settings = {
        let client = s.pool.get().await?;
        privacy::load(&client, org_id).await?
    };
    let shown: Vec<(Channel, PurposeKey, LawfulBasis)> = settings
        .purposes
        .iter()
        .filter(|d| !d.purpose.retired)
        .flat_map(|d| {
            d.purpose
                .channels
                .iter()
                .map(|c| (*c, d.purpose.key.clone(), d.purpose.default_basis))
        })
        .collect();
    let done = match form.action {
        FormAction::OptOutAll => {
            let all: Vec<(Channel, PurposeKey)> =
                shown.iter().map(|(c, p, _)| (*c, p.clone())).collect();
            opt_out(
                &s,
                &ctx,
                (org_id, contact_id),
                &all,
                CaptureSource::PreferenceCenter,
                &meta,
            )
            .await?;
            "opted_out"
        }
        FormAction::Save => {
            let consent = consent_now(&s, org_id, contact_id).await?;
            let mut withdraw = Vec::new();
            for (channel, purpose, basis) in &shown {
                let was = says_yes(&consent, *basis, purpose, *channel);
                let now = form
                    .choices
                    .get(&format!("{purpose}.{}", channel.name()))
                    .is_some_and(|v| v == "on");
                if was && !now {
                    withdraw.push((*channel, purpose.clone()));
                } else if now && !was {
                    grant(
                        &s,
                        (org_id, contact_id),
                        &settings,
                        *channel,
                        purpose,
                        *basis,
                        &meta,
                    )
                    .await?;
                }
            }
            // Withdrawals take the opt-out's one path (it also honours Sec-GPC).
            opt_out(
                &s,
                &ctx,
                (org_id, contact_id),
                &withdraw,
                CaptureSource::PreferenceCenter,
                &meta,
            )
            .await?;
            "saved"
        }
        FormAction::Erase => {
            request_erasure(&s, (org_id, contact_id), lang, "preference_center", &meta).await?
        }
    };
    let lang_q = q
        .lang
        .as_deref()
        .map(|l| format!("&lang={l}"))
        .unwrap_or_default();
    Ok(RawAs::new(see_other(format!(
        "/preferences?token={}{lang_q}&done={done}",
        q.token
    ))))
}

/// A yes on the page: a grant with source `preference_center`, the page's text of the
/// purpose as its notice.
async fn grant(
    s: &AppState,
    (org_id, contact_id): (Uuid, Uuid),
    settings: &PrivacySettings,
    channel: Channel,
    purpose: &PurposeKey,
    basis: LawfulBasis,
    meta: &crm_domain::metadata::EventMetadata,
) -> Result<(), ApiError> {
    let text = notice_text(settings, purpose);
    let notice = ProofNotice {
        id: Line::parse("preference-center").map_err(|e| ApiError::internal(e.0))?,
        version: Line::parse("1").map_err(|e| ApiError::internal(e.0))?,
        sha256: NoticeHash::parse(&hex::encode(Sha256::digest(text.as_bytes())))
            .map_err(|e| ApiError::internal(e.0))?,
    };
    ledger::execute(
        &s.executor,
        org_id,
        contact_id,
        ConsentCommand::Record {
            contact_id,
            channel,
            purpose: purpose.clone(),
            contact_point: None,
            choice: Choice::Granted,
            proof: ConsentProof {
                lawful_basis: basis,
                source: CaptureSource::PreferenceCenter,
                notice: Some(notice),
                language: None,
                jurisdiction: None,
                expires_at: None,
                import_id: None,
            },
            rules: rules(settings),
        },
        meta,
    )
    .await?;
    Ok(())
}

/// Sends the erasure confirmation link to the contact's e-mail address on file, as a
/// message through the send gate; what came of it (`erase_sent`, `erase_no_address`,
/// `erase_not_sent`). `source`: where the contact asked.
pub(crate) async fn request_erasure(
    s: &AppState,
    (org_id, contact_id): (Uuid, Uuid),
    lang: &'static str,
    source: &str,
    meta: &crm_domain::metadata::EventMetadata,
) -> Result<&'static str, ApiError> {
    let t = texts(Some(lang)).1;
    let Some(mut gate) = s.gate.load(org_id, contact_id).await? else {
        return Err(ApiError::NotFound("contact not found"));
    };
    let Some(to) = state::contact_point(&gate.points, Channel::Email) else {
        return Ok("erase_no_address");
    };
    let (token, _) = {
        let client = s.pool.get().await?;
        links::issue_erasure(&client, org_id, contact_id, source).await?
    };
    let base = s.settings.mail.link_base.trim_end_matches('/');
    let content = Content {
        to: to.clone(),
        subject: Some(t.erase_confirm_heading.to_owned()),
        body: format!(
            "{}\n\n{base}/preferences/erase?token={token}&lang={lang}\n\n{}",
            t.erase_text, t.erase_confirm_text
        ),
    };
    // The reply to the contact's own request: its built-in purpose, through the gate
    // like every message (the suppression list and Do Not Contact still stop it).
    let request = crm_domain::consent::gate::Request {
        channel: Channel::Email,
        purpose: PurposeKey::parse(DATA_SUBJECT_REQUEST).expect("valid key"),
        contact_point: to,
    };
    let (decision, _) = super::messages::submit(
        s,
        &mut gate,
        org_id,
        contact_id,
        Uuid::now_v7(),
        request,
        content,
        meta,
    )
    .await?;
    Ok(if decision.allowed {
        "erase_sent"
    } else {
        "erase_not_sent"
    })
}

/// The page of an erasure link that is unknown, used or expired.
fn unknown_erasure_link(
    lang: &'static str,
    t: &'static Texts,
) -> Result<warp::reply::Response, ApiError> {
    notice_page(
        StatusCode::NOT_FOUND,
        lang,
        String::new(),
        t.erase_confirm_heading,
        t.link_unknown.to_owned(),
        None,
    )
}

/// `GET /preferences/erase?token=`: asks the contact to confirm (a link a mail scanner
/// opens must not erase anything: the erasure is the form's POST).
pub(crate) async fn erase_confirm_page(
    s: AppState,
    Query(q): Query<TokenQuery>,
) -> Result<RawAs<HtmlPage>, ApiError> {
    let (lang, t) = texts(q.lang.as_deref());
    let found = {
        let client = s.pool.get().await?;
        links::erasure_confirmation(&client, &q.token, Utc::now(), false).await?
    };
    let Some((org_id, _, _)) = found else {
        return Ok(RawAs::new(unknown_erasure_link(lang, t)?));
    };
    let lang_q = q
        .lang
        .as_deref()
        .map(|l| format!("&lang={l}"))
        .unwrap_or_default();
    let page = notice_page(
        StatusCode::OK,
        lang,
        org_name(&s, org_id).await?,
        t.erase_confirm_heading,
        t.erase_confirm_text.to_owned(),
        Some((
            format!("/preferences/erase?token={}{lang_q}", q.token),
            t.erase_confirm_button,
        )),
    )?;
    Ok(RawAs::new(page))
}

/// `POST /preferences/erase?token=`: the confirmed erasure (the link works once).
pub(crate) async fn erase_confirmed(
    s: AppState,
    ctx: RequestContext,
    Query(q): Query<TokenQuery>,
) -> Result<RawAs<HtmlPage>, ApiError> {
    let (lang, t) = texts(q.lang.as_deref());
    let found = {
        let client = s.pool.get().await?;
        links::erasure_confirmation(&client, &q.token, Utc::now(), true).await?
    };
    let Some((org_id, contact_id, source)) = found else {
        return Ok(RawAs::new(unknown_erasure_link(lang, t)?));
    };
    let name = org_name(&s, org_id).await?;
    let meta = contact_metadata(&ctx, org_id, contact_id);
    let source = if source == "portal" {
        RequestSource::Portal
    } else {
        RequestSource::PreferenceCenter
    };
    let receipt = super::rights::erase_contact(&s, org_id, contact_id, source, &meta).await?;
    // Its preference links die with it.
    {
        let client = s.pool.get().await?;
        links::revoke_all(&client, org_id, contact_id).await?;
    }
    let page = notice_page(
        StatusCode::OK,
        lang,
        name,
        t.erased_heading,
        format!("{} {}.", t.erased_text, receipt.request_id()),
        None,
    )?;
    Ok(RawAs::new(page))
}

/// `GET /preferences/export?token=`: the contact's own copy of its data (recorded as
/// an export with source `preference_center`): everything, every field.
pub(crate) async fn export(
    s: AppState,
    ctx: RequestContext,
    Query(q): Query<TokenQuery>,
) -> Result<RawAs<OwnExport>, ApiError> {
    let (lang, _) = texts(q.lang.as_deref());
    let (org_id, contact_id) = match opened(&s, &q.token, lang).await? {
        Ok(found) => found,
        Err(page) => return Ok(RawAs::new(page)),
    };
    let meta = contact_metadata(&ctx, org_id, contact_id);
    // The person's own data: nothing of it is hidden from them.
    let everything = builtin_policy(Role::Owner);
    let response = super::rights::export_contact(
        &s,
        org_id,
        contact_id,
        RequestSource::PreferenceCenter,
        &meta,
        &everything,
    )
    .await?;
    Ok(RawAs::new(response))
}

// ---- staff: links ------------------------------------------------------------------

/// `POST /v1/contacts/{id}/preference-link`: optional lifetime.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LinkInput {
    /// Days the link works, 1 to 365 (default 30).
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 365)]
    days: Option<i64>,
}

/// A new preference link: shown once.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LinkDoc {
    /// The page's address, for the contact only.
    url: String,
    token: String,
    expires_at: chrono::DateTime<Utc>,
}

/// Links revoked.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Revoked {
    revoked: u64,
}

pub(crate) async fn issue_link(
    s: AppState,
    a: Authed,
    Id(id): Id,
    crate::edge::extract::OptionalJson(input): crate::edge::extract::OptionalJson<LinkInput>,
) -> Result<Created<LinkDoc>, ApiError> {
    let days = input.days.unwrap_or(links::LINK_DAYS);
    if !(1..=365).contains(&days) {
        return Err(ApiError::Validation(vec![crate::error::FieldError::new(
            "days", "1 to 365",
        )]));
    }
    let org = a.caller.org_id;
    let client = s.pool.get().await?;
    match state::contact_presence(&s.executor, &client, org, id).await? {
        Presence::Live => {}
        Presence::Missing => return Err(ApiError::NotFound("contact not found")),
        Presence::Erased => return Err(ApiError::erased()),
    }
    let (token, expires_at) = links::issue(&client, org, id, days).await?;
    let base = s.settings.mail.link_base.trim_end_matches('/');
    Ok(Created {
        location: format!("/v1/contacts/{id}"),
        body: LinkDoc {
            url: format!("{base}/preferences?token={token}"),
            token,
            expires_at,
        },
    })
}

pub(crate) async fn revoke_links(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<Revoked>, ApiError> {
    let client = s.pool.get().await?;
    let revoked = links::revoke_all(&client, a.caller.org_id, id).await?;
    Ok(Ok200(Revoked { revoked }))
}
