//! Bodies several operations answer or take: a command's outcome, a token, a message,
//! and the RFC 3339 time of query parameters.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// What a command wrote.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11", "version": 2, "positions": [1041]}))]
pub struct Outcome {
    /// The record's id.
    pub id: String,
    /// The record's version after the command (pass it as `expected_version`).
    pub version: i64,
    /// Global positions of the events written, in order (empty when nothing changed):
    /// pass the last as `min_position` to read your write.
    pub positions: Vec<i64>,
}

impl From<&crm_infra::commands::executor::CommandOutcome> for Outcome {
    fn from(o: &crm_infra::commands::executor::CommandOutcome) -> Self {
        Self {
            id: o.id.clone(),
            version: o.version,
            positions: o.positions.clone(),
        }
    }
}

/// A bearer token.
#[derive(Debug, Serialize, ToSchema)]
pub struct Token {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// A sentence for a person.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub message: String,
}

impl Message {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// The id of a created record.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    pub id: uuid::Uuid,
}

/// An RFC 3339 time in a query parameter (e.g. `2026-01-31T12:00:00Z`).
#[derive(Debug, Clone, Copy)]
pub struct Time(pub chrono::DateTime<chrono::Utc>);

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        chrono::DateTime::parse_from_rfc3339(&raw)
            .map(|t| Time(t.with_timezone(&chrono::Utc)))
            .map_err(|_| {
                serde::de::Error::custom("must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
            })
    }
}

/// Patterns the document gives strings, mirroring the domain's value objects. Schema
/// attributes name them as `pattern = "@line"` (attributes take only literals); the
/// document replaces each name with its pattern ([`pattern::expand`]).
pub mod pattern {
    /// The pattern a `@name` placeholder stands for.
    pub fn expand(placeholder: &str) -> Option<&'static str> {
        Some(match placeholder {
            "@line" => LINE,
            "@no_nul" => NO_NUL,
            "@email" => EMAIL,
            "@phone" => PHONE,
            "@country" => COUNTRY,
            "@custom_key" => CUSTOM_KEY,
            "@custom_text" => CUSTOM_TEXT,
            _ => return None,
        })
    }

    /// A line of text (`Text<MAX>`): something besides white space, no control
    /// characters (Unicode Cc).
    pub const LINE: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$";
    /// Anything PostgreSQL text can hold: no NUL.
    pub const NO_NUL: &str = "^[^\\u0000]*$";
    /// `Email`: a plain address, a domain of two or more labels.
    pub const EMAIL: &str = "^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)+[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$";
    /// `Phone`: E.164.
    pub const PHONE: &str = "^\\+[1-9][0-9]{7,14}$";
    /// `CountryCode`: ISO 3166-1 alpha-2.
    pub const COUNTRY: &str = "^[A-Za-z]{2}$";
    /// `CustomFieldKey`.
    pub const CUSTOM_KEY: &str = "^[a-z][a-z0-9_]{0,63}$";
    /// A custom field's text: line breaks and tabs, no other control characters.
    pub const CUSTOM_TEXT: &str =
        "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$";
}

use std::borrow::Cow;
use utoipa::openapi::schema::{
    AdditionalProperties, ObjectBuilder, OneOfBuilder, SchemaFormat, Type,
};
use utoipa::openapi::{KnownFormat, RefOr, Schema};

fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(values.into_iter().map(str::to_owned)))
            .build(),
    )
}

/// A schema type the document names, whose schema is built by hand (an enum from the
/// domain's own list, a map with constrained keys).
macro_rules! documented {
    ($(#[$doc:meta])* $ty:ident, $build:expr) => {
        $(#[$doc])*
        pub struct $ty;
        impl utoipa::PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                RefOr::T($build)
            }
        }
        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($ty))
            }
        }
    };
}

documented!(
    /// A permission, `module.action` (docs/permissions.md).
    PermissionName,
    string_enum(crm_domain::access::Permission::ALL.iter().map(|p| p.name()))
);

documented!(
    /// A module of the service.
    ModuleName,
    string_enum(crm_domain::access::Module::ALL.iter().map(|m| m.name()))
);

documented!(
    /// A contact field, as roles and the field-access audit name them.
    ContactFieldName,
    string_enum(crm_domain::access::CONTACT_FIELDS)
);

documented!(
    /// A built-in role's name or a custom role's id.
    RoleName,
    Schema::OneOf(
        OneOfBuilder::new()
            .item(string_enum(crm_domain::access::Role::ALL.iter().map(|r| r.name())))
            .item(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
                    .build(),
            ))
            .build(),
    )
);

documented!(
    /// Per contact field, what a role may do with it (absent: hidden).
    FieldPolicy,
    {
        let access = string_enum(["hidden", "read", "write"]);
        let mut o = ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        for f in crm_domain::access::CONTACT_FIELDS {
            o = o.property(f, access.clone());
        }
        Schema::Object(o.build())
    }
);

fn custom_fields(nullable: bool) -> Schema {
    let mut value = OneOfBuilder::new()
        .item(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(2000))
                .pattern(Some(pattern::CUSTOM_TEXT))
                .build(),
        ))
        .item(Schema::Object(
            ObjectBuilder::new().schema_type(Type::Number).build(),
        ))
        .item(Schema::Object(
            ObjectBuilder::new().schema_type(Type::Boolean).build(),
        ));
    if nullable {
        value = value.item(Schema::Object(
            ObjectBuilder::new().schema_type(Type::Null).build(),
        ));
    }
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .max_properties(Some(100))
            .property_names(Some(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(pattern::CUSTOM_KEY))
                    .build(),
            )))
            .additional_properties(Some(Schema::OneOf(value.build())))
            .build(),
    )
}

documented!(
    /// Custom fields: up to 100 keys of `a-z 0-9 _` (starting with a letter, at most
    /// 64), each a string (at most 2,000 characters), a number or a boolean.
    CustomFields,
    custom_fields(false)
);

documented!(
    /// Custom fields to set, or to clear with `null`.
    CustomFieldChanges,
    custom_fields(true)
);

/// The wire names of a domain enum (its serde names, snake_case).
fn serde_names<T: serde::Serialize>(values: impl IntoIterator<Item = T>) -> Vec<String> {
    values.into_iter().map(|v| wire_name(&v)).collect()
}

/// A unit enum value's name on the wire (its serde name; empty for anything else).
pub fn wire_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn names_enum<T: serde::Serialize>(values: impl IntoIterator<Item = T>) -> Schema {
    let names = serde_names(values);
    string_enum(names.iter().map(String::as_str))
}

documented!(
    /// A channel: `email`, `sms`, `whatsapp`, `phone` or `postal`.
    ChannelName,
    names_enum(crm_domain::consent::Channel::ALL)
);

documented!(
    /// A lawful basis (GDPR Art. 6(1)).
    LawfulBasisName,
    {
        use crm_domain::consent::LawfulBasis as L;
        names_enum([
            L::Consent,
            L::Contract,
            L::LegalObligation,
            L::VitalInterests,
            L::PublicTask,
            L::LegitimateInterests,
        ])
    }
);

documented!(
    /// How a consent change was captured.
    CaptureSourceName,
    names_enum(crm_domain::consent::proof::CaptureSource::ALL)
);

documented!(
    /// The state of a consent record.
    ConsentStatusName,
    {
        use crm_domain::consent::ConsentStatus as S;
        names_enum([
            S::Granted,
            S::PendingConfirmation,
            S::Withdrawn,
            S::Denied,
            S::Expired,
        ])
    }
);

documented!(
    /// A privacy mode: `gdpr` (opt-in) or `ccpa` (opt-out).
    PrivacyModeName,
    {
        use crm_domain::consent::PrivacyMode as M;
        names_enum([M::Gdpr, M::Ccpa])
    }
);

documented!(
    /// The send gate's reason code (docs/consent.md).
    ReasonName,
    names_enum(crm_domain::consent::gate::Reason::ALL)
);

documented!(
    /// An IANA time zone (`Europe/Berlin`, `America/New_York`, `UTC`).
    TimeZoneName,
    string_enum(chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()))
);
