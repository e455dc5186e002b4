//! Who may do what: permissions, modules, field visibility, and the ten built-in roles.
//!
//! Deny by default: a role holds exactly the permissions listed for it, and a field a
//! role does not name is hidden. No permission implies another; in particular the
//! sensitive ones ([`Permission::is_sensitive`]) are granted only by name.
//! docs/permissions.md is the written form of [`builtin_policy`]; a test keeps the two
//! equal.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A suite an organisation switches on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    /// Users, roles, API keys, organisation settings: always on.
    Core,
    Contacts,
    Activity,
    Reports,
    Portal,
}

impl Module {
    pub const ALL: [Module; 5] = [
        Self::Core,
        Self::Contacts,
        Self::Activity,
        Self::Reports,
        Self::Portal,
    ];
    /// What a new organisation has switched on.
    pub const DEFAULT: [Module; 4] = [Self::Core, Self::Contacts, Self::Activity, Self::Reports];

    pub fn name(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::Contacts => "contacts",
            Self::Activity => "activity",
            Self::Reports => "reports",
            Self::Portal => "portal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

macro_rules! permissions {
    ($($variant:ident = $name:literal, $module:ident, $sensitive:literal;)*) => {
        /// One thing a caller may do. Written `module.action` on the wire and in docs.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Permission {
            $(#[serde(rename = $name)] $variant,)*
        }

        impl Permission {
            pub const ALL: &'static [Permission] = &[$(Self::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)* }
            }

            /// The module a request needing this permission belongs to.
            pub fn module(self) -> Module {
                match self { $(Self::$variant => Module::$module,)* }
            }

            /// Sensitive permissions are never part of a default grant by implication:
            /// a role has one only if it is listed by name.
            pub fn is_sensitive(self) -> bool {
                match self { $(Self::$variant => $sensitive,)* }
            }
        }
    };
}

permissions! {
    ContactsRead = "contacts.read", Contacts, false;
    ContactsCreate = "contacts.create", Contacts, false;
    ContactsUpdate = "contacts.update", Contacts, false;
    ContactsArchive = "contacts.archive", Contacts, false;
    ContactsHistory = "contacts.history", Contacts, false;
    ActivityRead = "activity.read", Activity, false;
    ReportsRead = "reports.read", Reports, false;
    UsersRead = "users.read", Core, false;
    UsersManage = "users.manage", Core, false;
    RolesRead = "roles.read", Core, false;
    ApiKeysManage = "api_keys.manage", Core, false;
    OrganizationManage = "organization.manage", Core, false;
    PortalManage = "portal.manage", Portal, false;
    ConsentRead = "consent.read", Contacts, false;
    ConsentManage = "consent.manage", Contacts, false;
    MessagesSend = "messages.send", Contacts, false;
    MessagesRead = "messages.read", Contacts, false;
    PrivacyManage = "privacy.manage", Core, false;
    ContactsExport = "contacts.export", Contacts, true;
    ContactsErase = "contacts.erase", Contacts, true;
    ContactsLegalHold = "contacts.legal_hold", Contacts, true;
    ContactsRestrict = "contacts.restrict", Contacts, true;
    ErasuresRead = "erasures.read", Core, true;
    ConsentProofView = "consent.proof.view", Contacts, true;
    CredentialsDecrypt = "credentials.decrypt", Core, true;
    WebhooksManage = "webhooks.manage", Core, true;
    SecurityRead = "security.read", Core, true;
    RolesManage = "roles.manage", Core, true;
    AiApprove = "ai.approve", Core, true;
    AiAuditRead = "ai.audit.read", Core, true;
}

impl Permission {
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.name() == s)
    }
}

/// What a role may do with one field of a contact. Ordered: `Write` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldAccess {
    Hidden,
    Read,
    Write,
}

/// The contact fields field-level permissions apply to (`custom` covers every custom
/// field).
pub const CONTACT_FIELDS: [&str; 9] = [
    "given_name",
    "family_name",
    "email",
    "phone",
    "address",
    "company",
    "title",
    "time_zone",
    "custom",
];

/// What a role grants: permissions and the visibility of each contact field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Policy {
    pub permissions: BTreeSet<Permission>,
    /// Fields not named are hidden.
    pub fields: BTreeMap<String, FieldAccess>,
}

impl Policy {
    pub fn allows(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }

    pub fn field(&self, name: &str) -> FieldAccess {
        self.fields
            .get(name)
            .copied()
            .unwrap_or(FieldAccess::Hidden)
    }

    /// Removes from a contact's fields (a JSON object keyed by [`CONTACT_FIELDS`])
    /// every field this policy hides: absent, not null.
    pub fn redact_fields(&self, fields: &mut serde_json::Map<String, serde_json::Value>) {
        for name in CONTACT_FIELDS {
            if self.field(name) == FieldAccess::Hidden {
                fields.remove(name);
            }
        }
    }

    /// The first of `names` this policy does not let the caller write.
    pub fn first_unwritable<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        names
            .into_iter()
            .find(|n| self.field(n) != FieldAccess::Write)
    }

    /// The first of `names` this policy hides.
    pub fn first_hidden<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        names
            .into_iter()
            .find(|n| self.field(n) == FieldAccess::Hidden)
    }

    /// Whether everything `self` grants, `other` grants too.
    pub fn is_within(&self, other: &Policy) -> bool {
        self.permissions.is_subset(&other.permissions)
            && CONTACT_FIELDS
                .iter()
                .all(|f| self.field(f) <= other.field(f))
    }

    /// What `self` grants that `cap` grants too: the permissions of both, and each
    /// field at the lesser of the two accesses.
    pub fn capped_by(&self, cap: &Policy) -> Policy {
        Policy {
            permissions: self
                .permissions
                .intersection(&cap.permissions)
                .copied()
                .collect(),
            fields: CONTACT_FIELDS
                .iter()
                .map(|f| ((*f).to_owned(), self.field(f).min(cap.field(f))))
                .filter(|(_, a)| *a != FieldAccess::Hidden)
                .collect(),
        }
    }

    /// What `self` grants beyond `other`, named (`contacts.export`, `field email: write`).
    pub fn excess_over(&self, other: &Policy) -> Vec<String> {
        let mut out: Vec<String> = self
            .permissions
            .difference(&other.permissions)
            .map(|p| p.name().to_owned())
            .collect();
        for f in CONTACT_FIELDS {
            if self.field(f) > other.field(f) {
                out.push(format!("field {f}: {:?}", self.field(f)).to_lowercase());
            }
        }
        out
    }

    fn build(perms: &[Permission], fields: &[(&str, FieldAccess)]) -> Self {
        Self {
            permissions: perms.iter().copied().collect(),
            fields: fields
                .iter()
                .filter(|(_, a)| *a != FieldAccess::Hidden)
                .map(|(f, a)| ((*f).to_owned(), *a))
                .collect(),
        }
    }
}

/// The built-in roles every organisation has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Board,
    Executive,
    Director,
    Team,
    Support,
    Partner,
    Viewer,
    Client,
}

impl Role {
    pub const ALL: [Role; 10] = [
        Self::Owner,
        Self::Admin,
        Self::Board,
        Self::Executive,
        Self::Director,
        Self::Team,
        Self::Support,
        Self::Partner,
        Self::Viewer,
        Self::Client,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Board => "board",
            Self::Executive => "executive",
            Self::Director => "director",
            Self::Team => "team",
            Self::Support => "support",
            Self::Partner => "partner",
            Self::Viewer => "viewer",
            Self::Client => "client",
        }
    }

    pub fn parse(input: &str) -> Option<Self> {
        let lower = input.to_ascii_lowercase();
        Self::ALL.into_iter().find(|r| r.name() == lower)
    }
}

/// The role a user or an API key holds: a built-in one or a custom role of the
/// organisation. On the wire: the built-in's name, or the custom role's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleRef {
    Builtin(Role),
    Custom(Uuid),
}

impl RoleRef {
    pub fn parse(s: &str) -> Option<Self> {
        Role::parse(s)
            .map(Self::Builtin)
            .or_else(|| Uuid::parse_str(s).ok().map(Self::Custom))
    }

    pub fn is_owner(self) -> bool {
        self == Self::Builtin(Role::Owner)
    }
}

impl std::fmt::Display for RoleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin(r) => f.write_str(r.name()),
            Self::Custom(id) => write!(f, "{id}"),
        }
    }
}

impl Serialize for RoleRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RoleRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown role `{s}`")))
    }
}

/// The policy of a built-in role. See docs/permissions.md for the reasoning.
pub fn builtin_policy(role: Role) -> Policy {
    use FieldAccess::{Hidden as H, Read as R, Write as W};
    use Permission::*;
    let all_fields = |a: FieldAccess| -> Vec<(&'static str, FieldAccess)> {
        CONTACT_FIELDS.iter().map(|f| (*f, a)).collect()
    };
    match role {
        Role::Owner | Role::Admin => Policy::build(Permission::ALL, &all_fields(W)),
        Role::Board => Policy::build(&[ReportsRead, ActivityRead], &[]),
        Role::Executive => Policy::build(
            &[
                ContactsRead,
                ContactsHistory,
                ActivityRead,
                ReportsRead,
                UsersRead,
                RolesRead,
                ContactsExport,
                ConsentRead,
                MessagesRead,
            ],
            &all_fields(R),
        ),
        Role::Director => Policy::build(
            &[
                ContactsRead,
                ContactsCreate,
                ContactsUpdate,
                ContactsArchive,
                ContactsHistory,
                ActivityRead,
                ReportsRead,
                UsersRead,
                RolesRead,
                ContactsExport,
                AiApprove,
                AiAuditRead,
                PortalManage,
                ConsentRead,
                ConsentManage,
                MessagesSend,
                MessagesRead,
            ],
            &all_fields(W),
        ),
        Role::Team => Policy::build(
            &[
                ContactsRead,
                ContactsCreate,
                ContactsUpdate,
                ContactsHistory,
                ActivityRead,
                ConsentRead,
                ConsentManage,
                MessagesSend,
                MessagesRead,
            ],
            &all_fields(W),
        ),
        Role::Support => Policy::build(
            &[
                ContactsRead,
                ContactsUpdate,
                ContactsHistory,
                PortalManage,
                ConsentRead,
                ConsentManage,
                MessagesRead,
            ],
            &[
                ("given_name", R),
                ("family_name", R),
                ("email", W),
                ("phone", W),
                ("address", W),
                ("company", R),
                ("title", R),
                ("time_zone", W),
                ("custom", R),
            ],
        ),
        Role::Partner => Policy::build(
            &[ContactsRead, ContactsCreate],
            &[
                ("given_name", W),
                ("family_name", W),
                ("email", R),
                ("phone", H),
                ("address", H),
                ("company", W),
                ("title", W),
                ("time_zone", H),
                ("custom", H),
            ],
        ),
        Role::Viewer => Policy::build(
            &[ContactsRead],
            &[
                ("given_name", R),
                ("family_name", R),
                ("company", R),
                ("title", R),
            ],
        ),
        // The portal role: a contact looking at its own record through /portal. It has
        // no staff permission at all; portal routes scope by the contact's own id.
        Role::Client => Policy::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_builtin_role_but_owner_and_admin_holds_manage_roles_or_erase() {
        for role in Role::ALL {
            let p = builtin_policy(role);
            let full = matches!(role, Role::Owner | Role::Admin);
            assert_eq!(p.allows(Permission::RolesManage), full, "{role:?}");
            assert_eq!(p.allows(Permission::ContactsErase), full, "{role:?}");
        }
    }

    #[test]
    fn defaults_the_issue_names() {
        let board = builtin_policy(Role::Board);
        assert!(board.allows(Permission::ReportsRead));
        assert!(CONTACT_FIELDS
            .iter()
            .all(|f| board.field(f) == FieldAccess::Hidden));
        let viewer = builtin_policy(Role::Viewer);
        for f in ["email", "phone", "address", "custom"] {
            assert_eq!(viewer.field(f), FieldAccess::Hidden, "{f}");
        }
        let support = builtin_policy(Role::Support);
        assert!(support.allows(Permission::ContactsRead));
        assert!(!support.allows(Permission::ContactsExport));
        assert!(!support.allows(Permission::ContactsErase));
        assert_eq!(builtin_policy(Role::Client), Policy::default());
    }

    #[test]
    fn within_and_excess() {
        let team = builtin_policy(Role::Team);
        let viewer = builtin_policy(Role::Viewer);
        assert!(viewer.is_within(&team));
        assert!(!team.is_within(&viewer));
        let excess = team.excess_over(&viewer);
        assert!(excess.contains(&"contacts.create".to_owned()), "{excess:?}");
        assert!(
            excess.contains(&"field email: write".to_owned()),
            "{excess:?}"
        );
    }

    #[test]
    fn a_capped_policy_is_within_both_and_the_cap_of_a_superset_is_the_lesser() {
        let team = builtin_policy(Role::Team);
        let viewer = builtin_policy(Role::Viewer);
        let support = builtin_policy(Role::Support);
        assert_eq!(team.capped_by(&viewer), viewer);
        assert_eq!(viewer.capped_by(&team), viewer);
        for (a, b) in [(&team, &support), (&support, &team), (&viewer, &support)] {
            let c = a.capped_by(b);
            assert!(c.is_within(a) && c.is_within(b), "{c:?}");
            for p in Permission::ALL {
                assert_eq!(c.allows(*p), a.allows(*p) && b.allows(*p), "{p:?}");
            }
        }
    }

    /// docs/permissions.md is the written matrix: its tables must be the code's.
    #[test]
    fn the_documented_matrix_is_the_code() {
        let doc = include_str!("../../docs/permissions.md");
        let (mut perms_seen, mut fields_seen) = (0, 0);
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let name = cells[0].trim_matches('`');
            if let Some(p) = Permission::parse(name) {
                assert_eq!(cells[1] == "yes", p.is_sensitive(), "{name}: sensitive");
                for (role, cell) in Role::ALL.iter().zip(&cells[2..]) {
                    let documented = *cell == "✓";
                    assert_eq!(
                        builtin_policy(*role).allows(p),
                        documented,
                        "{name} × {role:?}"
                    );
                }
                perms_seen += 1;
            } else if CONTACT_FIELDS.contains(&name) {
                for (role, cell) in Role::ALL.iter().zip(&cells[1..]) {
                    let code = format!("{:?}", builtin_policy(*role).field(name)).to_lowercase();
                    assert_eq!(&code, cell, "{name} × {role:?}");
                }
                fields_seen += 1;
            }
        }
        assert_eq!(
            perms_seen,
            Permission::ALL.len(),
            "every permission is documented"
        );
        assert_eq!(
            fields_seen,
            CONTACT_FIELDS.len(),
            "every field is documented"
        );
    }

    #[test]
    fn role_refs_round_trip() {
        let id = Uuid::now_v7();
        for r in [RoleRef::Builtin(Role::Support), RoleRef::Custom(id)] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<RoleRef>(&json).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&RoleRef::Builtin(Role::Owner)).unwrap(),
            "\"owner\""
        );
        assert!(RoleRef::parse("nobody").is_none());
    }
}
