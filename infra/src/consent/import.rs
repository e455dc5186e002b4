//! Bulk consent imports: CSV (a header row naming the columns) or JSON lines (one object
//! per line), thousands of rows. Each valid row becomes one `ConsentRecorded` event with
//! source `import` and the import's id in its proof; a bad row is reported with its
//! number and the field at fault and records nothing. Rows of one contact are recorded
//! in file order; different contacts in parallel.
//!
//! Columns (CSV) or members (JSON lines): `contact_id`, `channel`, `purpose`, `status`
//! (`granted`, `withdrawn`, `denied`), and optionally `contact_point`, `lawful_basis`,
//! `notice_id`, `notice_version`, `notice_sha256`, `language`, `jurisdiction`,
//! `expires_at` (RFC 3339). Unknown columns are refused (a typo would otherwise drop
//! proof silently).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use crm_domain::consent::ledger::{Choice, ConsentCommand, ConsentError, Rules};
use crm_domain::consent::privacy::PrivacySettings;
use crm_domain::consent::proof::{
    CaptureSource, ConsentProof, Jurisdiction, LanguageTag, Notice, NoticeHash,
};
use crm_domain::consent::{Channel, LawfulBasis, PurposeKey};
use crm_domain::metadata::EventMetadata;
use crm_domain::values::Line;
use futures::StreamExt;
use serde::Serialize;
use uuid::Uuid;

use super::{ledger, parse_point, privacy};
use crate::commands::executor::{CommandError, Executor};
use crate::store::event_store::StoreError;

/// The most rows one import takes.
pub const MAX_ROWS: usize = 100_000;
/// Contacts recorded at once.
const PARALLEL: usize = 8;

const COLUMNS: [&str; 12] = [
    "contact_id",
    "channel",
    "purpose",
    "status",
    "contact_point",
    "lawful_basis",
    "notice_id",
    "notice_version",
    "notice_sha256",
    "language",
    "jurisdiction",
    "expires_at",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// Why a whole import was refused (before any row was recorded).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the file has no rows")]
    Empty,
    #[error("at most {MAX_ROWS} rows per import")]
    TooManyRows,
    #[error("unknown column `{0}` (columns: {cols})", cols = COLUMNS.join(", "))]
    UnknownColumn(String),
    #[error("missing column `{0}`")]
    MissingColumn(&'static str),
    #[error("CSV: {0}")]
    Csv(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One row as read, before its values are parsed.
#[derive(Debug, Clone)]
pub struct RawRow {
    /// 1-based, as an editor shows it (the CSV header is line 1).
    pub line: usize,
    pub fields: BTreeMap<String, String>,
    /// The row could not be read at all (bad JSON).
    pub unreadable: Option<String>,
}

/// A row that was not recorded, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowError {
    pub line: usize,
    /// The column at fault, when there is one.
    pub field: Option<String>,
    pub message: String,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub import_id: Uuid,
    pub rows: usize,
    pub recorded: usize,
    pub errors: Vec<RowError>,
}

/// Reads the rows of `data`.
pub fn read(format: Format, data: &str) -> Result<Vec<RawRow>, ImportError> {
    let rows = match format {
        Format::Csv => read_csv(data)?,
        Format::JsonLines => read_json_lines(data),
    };
    if rows.is_empty() {
        return Err(ImportError::Empty);
    }
    if rows.len() > MAX_ROWS {
        return Err(ImportError::TooManyRows);
    }
    for required in ["contact_id", "channel", "purpose", "status"] {
        if format == Format::Csv && rows.iter().all(|r| !r.fields.contains_key(required)) {
            return Err(ImportError::MissingColumn(required));
        }
    }
    Ok(rows)
}

fn read_csv(data: &str) -> Result<Vec<RawRow>, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(data.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| ImportError::Csv(e.to_string()))?
        .iter()
        .map(str::to_owned)
        .collect();
    for h in &headers {
        if !COLUMNS.contains(&h.as_str()) {
            return Err(ImportError::UnknownColumn(h.clone()));
        }
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        match record {
            Ok(r) => rows.push(RawRow {
                line,
                fields: headers
                    .iter()
                    .zip(r.iter())
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(h, v)| (h.clone(), v.to_owned()))
                    .collect(),
                unreadable: None,
            }),
            Err(e) => rows.push(RawRow {
                line,
                fields: BTreeMap::new(),
                unreadable: Some(e.to_string()),
            }),
        }
    }
    Ok(rows)
}

fn read_json_lines(data: &str) -> Vec<RawRow> {
    let mut rows = Vec::new();
    for (i, text) in data.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let parsed: Result<BTreeMap<String, serde_json::Value>, _> = serde_json::from_str(text);
        let row = match parsed {
            Ok(map) => {
                let mut fields = BTreeMap::new();
                let mut unreadable = None;
                for (k, v) in map {
                    if !COLUMNS.contains(&k.as_str()) {
                        unreadable = Some(format!("unknown member `{k}`"));
                        break;
                    }
                    match v {
                        serde_json::Value::Null => {}
                        serde_json::Value::String(s) if s.is_empty() => {}
                        serde_json::Value::String(s) => {
                            fields.insert(k, s);
                        }
                        other => {
                            unreadable = Some(format!("`{k}` must be a string, not {other}"));
                            break;
                        }
                    }
                }
                RawRow {
                    line,
                    fields,
                    unreadable,
                }
            }
            Err(e) => RawRow {
                line,
                fields: BTreeMap::new(),
                unreadable: Some(format!("not a JSON object: {e}")),
            },
        };
        rows.push(row);
    }
    rows
}

/// A row's values, parsed.
struct Parsed {
    line: usize,
    contact_id: Uuid,
    channel: Channel,
    purpose: PurposeKey,
    choice: Choice,
    contact_point: Option<String>,
    lawful_basis: Option<LawfulBasis>,
    notice: Option<Notice>,
    language: Option<LanguageTag>,
    jurisdiction: Option<Jurisdiction>,
    expires_at: Option<DateTime<Utc>>,
}

fn enum_value<T: serde::de::DeserializeOwned>(raw: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(raw.to_owned())).ok()
}

fn parse_row(row: &RawRow, settings: &PrivacySettings) -> Result<Parsed, RowError> {
    let err = |field: &str, message: String| RowError {
        line: row.line,
        field: (!field.is_empty()).then(|| field.to_owned()),
        message,
    };
    if let Some(why) = &row.unreadable {
        return Err(err("", why.clone()));
    }
    let get = |name: &str| row.fields.get(name).map(String::as_str);
    let required = |name: &'static str| get(name).ok_or_else(|| err(name, "is required".into()));
    let contact_id = required("contact_id")?
        .parse::<Uuid>()
        .map_err(|_| err("contact_id", "must be a UUID".into()))?;
    let channel: Channel = enum_value(required("channel")?).ok_or_else(|| {
        err(
            "channel",
            "must be email, sms, whatsapp, phone or postal".into(),
        )
    })?;
    let purpose = PurposeKey::parse(required("purpose")?).map_err(|e| err("purpose", e.0))?;
    match settings.purpose(&purpose) {
        None => {
            return Err(err(
                "purpose",
                format!("no purpose `{purpose}` in this organisation's registry"),
            ))
        }
        Some(p) if p.purpose.retired => {
            return Err(err("purpose", format!("purpose `{purpose}` is retired")))
        }
        Some(p) if !p.purpose.channels.contains(&channel) => {
            return Err(err(
                "channel",
                format!("purpose `{purpose}` does not cover this channel"),
            ))
        }
        Some(_) => {}
    }
    let choice: Choice = enum_value(required("status")?)
        .ok_or_else(|| err("status", "must be granted, withdrawn or denied".into()))?;
    let contact_point = get("contact_point")
        .map(|p| parse_point(channel, p).map_err(|e| err("contact_point", e.0)))
        .transpose()?;
    let lawful_basis = get("lawful_basis")
        .map(|b| enum_value(b).ok_or_else(|| err("lawful_basis", "not a GDPR Art. 6 basis".into())))
        .transpose()?;
    let notice = match (
        get("notice_id"),
        get("notice_version"),
        get("notice_sha256"),
    ) {
        (None, None, None) => None,
        (Some(id), Some(version), Some(sha)) => Some(Notice {
            id: Line::parse(id).map_err(|e| err("notice_id", e.0))?,
            version: Line::parse(version).map_err(|e| err("notice_version", e.0))?,
            sha256: NoticeHash::parse(sha).map_err(|e| err("notice_sha256", e.0))?,
        }),
        _ => {
            return Err(err(
                "notice_id",
                "a notice needs notice_id, notice_version and notice_sha256 together".into(),
            ))
        }
    };
    let language = get("language")
        .map(|l| LanguageTag::parse(l).map_err(|e| err("language", e.0)))
        .transpose()?;
    let jurisdiction = get("jurisdiction")
        .map(|j| Jurisdiction::parse(j).map_err(|e| err("jurisdiction", e.0)))
        .transpose()?;
    let expires_at = get("expires_at")
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| err("expires_at", "must be an RFC 3339 time".into()))
        })
        .transpose()?;
    Ok(Parsed {
        line: row.line,
        contact_id,
        channel,
        purpose,
        choice,
        contact_point,
        lawful_basis,
        notice,
        language,
        jurisdiction,
        expires_at,
    })
}

fn domain_error(line: usize, e: CommandError<ConsentError>) -> Result<RowError, StoreError> {
    match e {
        CommandError::Domain(d @ ConsentError::NoticeRequired) => Ok(RowError {
            line,
            field: Some("notice_id".into()),
            message: d.to_string(),
        }),
        CommandError::Domain(d) => Ok(RowError {
            line,
            field: None,
            message: d.to_string(),
        }),
        CommandError::Store(e) => Err(e),
        CommandError::Conflict | CommandError::VersionMismatch { .. } => Ok(RowError {
            line,
            field: None,
            message: "another change to this contact's consent came first; import the row again"
                .into(),
        }),
    }
}

/// Records `rows` for `org_id` under `import_id`; `progress` is told the number of rows
/// done so far, as they finish.
pub async fn run(
    executor: &Executor,
    org_id: Uuid,
    import_id: Uuid,
    rows: Vec<RawRow>,
    meta: &EventMetadata,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Report, ImportError> {
    let settings = {
        let client = executor.pool().get().await.map_err(StoreError::from)?;
        privacy::load(&client, org_id).await?
    };
    let rules = Rules {
        mode: settings.mode,
        double_opt_in_for_marketing: settings.double_opt_in_for_marketing,
    };
    let total = rows.len();
    let mut errors = Vec::new();
    // Rows grouped by contact, in file order within each.
    let mut groups: BTreeMap<Uuid, Vec<Parsed>> = BTreeMap::new();
    for row in &rows {
        match parse_row(row, &settings) {
            Ok(p) => groups.entry(p.contact_id).or_default().push(p),
            Err(e) => errors.push(e),
        }
    }
    let done = AtomicUsize::new(errors.len());
    progress(errors.len());
    let recorded = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let fatal = Mutex::new(None);
    futures::stream::iter(groups)
        .for_each_concurrent(PARALLEL, |(contact_id, group)| {
            let (done, recorded, failures, fatal, settings) =
                (&done, &recorded, &failures, &fatal, &settings);
            async move {
                let exists = match exists(executor, org_id, contact_id).await {
                    Ok(e) => e,
                    Err(e) => {
                        *fatal.lock().expect("lock") = Some(e);
                        return;
                    }
                };
                for row in group {
                    let outcome = if !exists {
                        Some(RowError {
                            line: row.line,
                            field: Some("contact_id".into()),
                            message: "no such contact in this organisation, or it was erased"
                                .into(),
                        })
                    } else {
                        let command = ConsentCommand::Record {
                            contact_id,
                            channel: row.channel,
                            purpose: row.purpose.clone(),
                            contact_point: row.contact_point.clone(),
                            choice: row.choice,
                            proof: ConsentProof {
                                lawful_basis: row.lawful_basis.unwrap_or_else(|| {
                                    settings
                                        .purpose(&row.purpose)
                                        .map_or(LawfulBasis::Consent, |p| p.purpose.default_basis)
                                }),
                                source: CaptureSource::Import,
                                notice: row.notice.clone(),
                                language: row.language.clone(),
                                jurisdiction: row.jurisdiction.clone(),
                                expires_at: row.expires_at,
                                import_id: Some(import_id),
                            },
                            rules,
                        };
                        match ledger::execute(executor, org_id, contact_id, command, meta).await {
                            Ok(_) => {
                                recorded.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                            Err(e) => match domain_error(row.line, e) {
                                Ok(row_error) => Some(row_error),
                                Err(store) => {
                                    *fatal.lock().expect("lock") = Some(store);
                                    return;
                                }
                            },
                        }
                    };
                    if let Some(e) = outcome {
                        failures.lock().expect("lock").push(e);
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                }
            }
        })
        .await;
    if let Some(e) = fatal.into_inner().expect("lock") {
        return Err(e.into());
    }
    errors.extend(failures.into_inner().expect("lock"));
    errors.sort_by_key(|e| e.line);
    Ok(Report {
        import_id,
        rows: total,
        recorded: recorded.into_inner(),
        errors,
    })
}

/// Whether a row's contact exists and may take consent changes (an erased one may
/// not: nothing more is recorded about it).
async fn exists(executor: &Executor, org_id: Uuid, contact_id: Uuid) -> Result<bool, StoreError> {
    let client = executor.pool().get().await?;
    let presence = super::state::contact_presence(executor, &client, org_id, contact_id).await?;
    Ok(presence == super::state::Presence::Live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_keep_their_line_numbers_and_refuse_unknown_columns() {
        let rows = read(
            Format::Csv,
            "contact_id,channel,purpose,status\n\
             0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11,email,marketing,granted\n\
             x,email,marketing,granted\n",
        )
        .unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3]);
        let settings = PrivacySettings::defaults();
        assert!(parse_row(&rows[0], &settings).is_ok());
        let e = parse_row(&rows[1], &settings).err().unwrap();
        assert_eq!((e.line, e.field.as_deref()), (3, Some("contact_id")));
        assert!(matches!(
            read(Format::Csv, "contact_id,chanel\n1,2\n"),
            Err(ImportError::UnknownColumn(c)) if c == "chanel"
        ));
    }

    #[test]
    fn json_lines_name_the_bad_member() {
        let rows = read(
            Format::JsonLines,
            "{\"contact_id\":\"0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11\",\"channel\":\"fax\",\"purpose\":\"marketing\",\"status\":\"granted\"}\n\n{nope\n",
        )
        .unwrap();
        let settings = PrivacySettings::defaults();
        let e = parse_row(&rows[0], &settings).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("channel"));
        assert_eq!(rows[1].line, 3);
        assert!(parse_row(&rows[1], &settings).is_err());
    }

    #[test]
    fn a_partial_notice_is_refused() {
        let rows = read(
            Format::Csv,
            "contact_id,channel,purpose,status,notice_id\n\
             0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11,email,marketing,granted,pp\n",
        )
        .unwrap();
        let e = parse_row(&rows[0], &PrivacySettings::defaults())
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("notice_id"));
    }
}
