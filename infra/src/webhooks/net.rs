//! Where outbound webhook requests may go, and the HTTP client that keeps to it.
//!
//! - An address is refused when it belongs to the service's own networks: loopback,
//!   private (RFC 1918, IPv6 unique local), link-local, carrier-grade NAT, unspecified,
//!   multicast, broadcast, documentation and benchmarking ranges, and the IPv6 forms
//!   that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4) are judged
//!   by that address. An operator allowlist of networks (`CRM_WEBHOOK_ALLOW_NETS`)
//!   permits addresses in them all the same (tests use it for their local receivers).
//! - A host name is resolved once per connection by the client's own resolver
//!   ([`CheckedResolver`]): the addresses it hands back are the checked ones, and they
//!   are the ones connected to (no second lookup that could answer otherwise). An IP
//!   literal is checked before the request.
//! - Redirects are not followed (a 3xx is a failed attempt), no proxy from the
//!   environment is used, and each attempt has a timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// The operator's allowlist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPolicy {
    allow: Vec<IpNet>,
}

impl NetPolicy {
    /// A comma-separated list of networks (`127.0.0.1/32,10.1.0.0/16`) or addresses;
    /// empty: none.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut allow = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("`{item}` is not a network (CIDR) or an address"))?;
            allow.push(net);
        }
        Ok(Self { allow })
    }

    pub fn allowing(nets: Vec<IpNet>) -> Self {
        Self { allow: nets }
    }

    /// `Err(why)` when a request must not go to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        match forbidden(ip) {
            None => Ok(()),
            Some(why) if self.allow.iter().any(|n| n.contains(&ip)) => {
                let _ = why;
                Ok(())
            }
            Some(why) => Err(why),
        }
    }
}

/// Why `ip` is one of the service's own (or otherwise unroutable) addresses; `None`:
/// a public address.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
                Some("discard-only")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("carrier-grade NAT")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 198 && (o[1] == 18 || o[1] == 19) {
        Some("benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !(s[6] == 0 && s[7] <= 1) {
        return Some(tail);
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// A request refused by the policy.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {ip}, a {why} address, which webhooks may not reach (CRM_WEBHOOK_ALLOW_NETS permits it)")]
pub struct Forbidden {
    pub host: String,
    pub ip: IpAddr,
    pub why: &'static str,
}

/// The client's resolver: one lookup, then only the permitted addresses; none left is
/// an error naming the first refused one.
struct CheckedResolver {
    policy: Arc<NetPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            permitted(&policy, &host, addrs)
                .map(|ok| Box::new(ok.into_iter()) as reqwest::dns::Addrs)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
    }
}

/// The addresses of `addrs` the policy permits; `Err` naming the first refused when
/// none is (or when there were none at all).
pub fn permitted(
    policy: &NetPolicy,
    host: &str,
    addrs: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, Forbidden> {
    let mut first_refused = None;
    let ok: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match policy.check(a.ip()) {
            Ok(()) => true,
            Err(why) => {
                first_refused.get_or_insert((a.ip(), why));
                false
            }
        })
        .collect();
    if ok.is_empty() {
        let (ip, why) = first_refused.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), "unresolved"));
        return Err(Forbidden {
            host: host.to_owned(),
            ip,
            why,
        });
    }
    Ok(ok)
}

/// Checks a URL's host now (an IP literal, or every address its name resolves to
/// today): what endpoint creation answers. The delivery checks again at every attempt.
pub async fn check_url(policy: &NetPolicy, url: &str) -> Result<(), String> {
    let url = url::Url::parse(url).map_err(|e| e.to_string())?;
    let host = match url.host() {
        Some(url::Host::Ipv4(ip)) => return literal(policy, IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => return literal(policy, IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) => d.to_owned(),
        None => return Err("the URL has no host".into()),
    };
    let lookup = tokio::net::lookup_host((host.as_str(), 0));
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(a)) => a.collect(),
        // A name that does not resolve now (or not in time) may later; it is checked
        // at each attempt.
        Ok(Err(_)) | Err(_) => return Ok(()),
    };
    for a in &addrs {
        if let Err(why) = policy.check(a.ip()) {
            return Err(Forbidden {
                host,
                ip: a.ip(),
                why,
            }
            .to_string());
        }
    }
    Ok(())
}

fn literal(policy: &NetPolicy, ip: IpAddr) -> Result<(), String> {
    policy.check(ip).map_err(|why| {
        Forbidden {
            host: ip.to_string(),
            ip,
            why,
        }
        .to_string()
    })
}

/// What one attempt got.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The first 1,024 bytes of the body, as text (invalid UTF-8 replaced).
    pub excerpt: String,
    pub latency: Duration,
}

/// Why an attempt got no answer.
#[derive(Debug, Clone)]
pub struct NoAnswer {
    /// `forbidden_address`, `timeout`, `connect`, `request`.
    pub kind: &'static str,
    pub message: String,
    pub latency: Duration,
}

/// The webhook client: the policy's resolver, no redirects, no proxy, a timeout.
#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    policy: Arc<NetPolicy>,
}

/// At most this much of a response is read.
const EXCERPT: usize = 1024;

impl WebhookClient {
    pub fn new(policy: NetPolicy, timeout: Duration) -> Result<Self, String> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("crm-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http, policy })
    }

    pub fn policy(&self) -> &NetPolicy {
        &self.policy
    }

    /// POSTs `body` with `headers` to `url`.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: bytes::Bytes,
    ) -> Result<Answer, NoAnswer> {
        let started = Instant::now();
        let fail = |kind: &'static str, message: String| NoAnswer {
            kind,
            message,
            latency: started.elapsed(),
        };
        let parsed = url::Url::parse(url).map_err(|e| fail("request", e.to_string()))?;
        let literal = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal {
            if let Err(why) = self.policy.check(ip) {
                let f = Forbidden {
                    host: ip.to_string(),
                    ip,
                    why,
                };
                return Err(fail("forbidden_address", f.to_string()));
            }
        }
        let mut request = self
            .http
            .post(parsed)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let mut response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                if let Some(f) = find::<Forbidden>(&e) {
                    return Err(fail("forbidden_address", f.to_string()));
                }
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                return Err(fail(kind, describe(&e)));
            }
        };
        let status = response.status().as_u16();
        let mut excerpt = Vec::new();
        while excerpt.len() < EXCERPT {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = EXCERPT - excerpt.len();
                    excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(Answer {
            status,
            excerpt: String::from_utf8_lossy(&excerpt).into_owned(),
            latency: started.elapsed(),
        })
    }
}

fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// The error and its causes on one line (reqwest's own text names only the outermost).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_own_networks_are_refused() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "::127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{ip} must be refused");
        }
        for ip in ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(forbidden(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn the_allowlist_permits_what_it_names_only() {
        let policy = NetPolicy::parse("127.0.0.1/32, 10.1.0.0/16").unwrap();
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("10.1.2.3".parse().unwrap()).is_ok());
        assert!(policy.check("127.0.0.2".parse().unwrap()).is_err());
        assert!(policy.check("10.2.0.1".parse().unwrap()).is_err());
        assert!(NetPolicy::parse("nonsense").is_err());
        assert_eq!(NetPolicy::parse("").unwrap(), NetPolicy::default());
    }

    #[test]
    fn of_the_resolved_addresses_only_the_permitted_are_connected_to() {
        let policy = NetPolicy::default();
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:0".parse().unwrap(),
            "93.184.215.14:0".parse().unwrap(),
        ];
        assert_eq!(
            permitted(&policy, "h", addrs).unwrap(),
            vec!["93.184.215.14:0".parse::<SocketAddr>().unwrap()]
        );
        let err = permitted(&policy, "h", vec!["10.0.0.1:0".parse().unwrap()]).unwrap_err();
        assert_eq!(err.why, "private");
    }
}
