//! Rate limits at the edge, per client IP address (governor's keyed GCRA limiters):
//! the API and the authentication endpoints have a budget each; a request over it is
//! answered 429 with `Retry-After`. Health probes and metrics are not limited.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Requests per second per client IP; 0 turns a limit off.
#[derive(Clone, Copy, Debug)]
pub struct RateLimitSettings {
    /// Every `/v1/...` route except authentication.
    pub api_per_sec: u32,
    /// `/v1/auth/...`.
    pub auth_per_sec: u32,
    /// Failed logins per account per hour before its logins are refused.
    pub failed_logins_per_hour: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            api_per_sec: 30,
            auth_per_sec: 5,
            failed_logins_per_hour: FAILED_LOGINS_PER_HOUR,
        }
    }
}

/// Which budget a request draws on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Api,
    Auth,
    Unlimited,
}

impl Class {
    pub fn of(path: &str) -> Self {
        if path.starts_with("/v1/auth/") || path.starts_with("/portal/auth/") {
            Self::Auth
        } else if path.starts_with("/v1/") || path.starts_with("/portal/") || path == "/mcp" {
            Self::Api
        } else {
            Self::Unlimited
        }
    }
}

#[derive(Clone)]
pub struct RateLimits {
    api: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    auth: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    failed_logins: FailedLogins,
}

/// Failed logins per account (keyed by the email as typed, normalised, whether or not
/// the account exists, so that the answers do not tell): at most
/// [`FAILED_LOGINS_PER_HOUR`] by default; past that, every login for it is refused until
/// the budget refills (by default one attempt per 36 s).
#[derive(Clone)]
pub struct FailedLogins {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    locked_until: Arc<Mutex<HashMap<String, Instant>>>,
}

pub const FAILED_LOGINS_PER_HOUR: u32 = 100;

fn account_key(email: &str) -> String {
    email.trim().to_lowercase()
}

impl FailedLogins {
    fn new(per_hour: u32) -> Self {
        Self {
            limiter: NonZeroU32::new(per_hour)
                .map(|n| Arc::new(RateLimiter::keyed(Quota::per_hour(n)))),
            locked_until: Default::default(),
        }
    }

    /// `Err(wait)` while the account is locked out.
    pub fn check(&self, email: &str) -> Result<(), Duration> {
        let key = account_key(email);
        let now = Instant::now();
        let mut locked = self.locked_until.lock().expect("lockout map poisoned");
        match locked.get(&key) {
            Some(until) if *until > now => Err(*until - now),
            Some(_) => {
                locked.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failed login; `Err(wait)` when it is one too many: the account is then
    /// locked out for `wait`.
    pub fn record_failure(&self, email: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let key = account_key(email);
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            self.locked_until
                .lock()
                .expect("lockout map poisoned")
                .insert(key, Instant::now() + wait);
            wait
        })
    }

    fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let now = Instant::now();
        self.locked_until
            .lock()
            .expect("lockout map poisoned")
            .retain(|_, until| *until > now);
    }
}

fn limiter(per_sec: u32) -> Option<Arc<DefaultKeyedRateLimiter<IpAddr>>> {
    // The whole second's budget may come at once: the (n+1)th request within a second
    // is the first refused.
    NonZeroU32::new(per_sec).map(|n| Arc::new(RateLimiter::keyed(Quota::per_second(n))))
}

impl RateLimits {
    pub fn new(settings: RateLimitSettings) -> Self {
        Self {
            api: limiter(settings.api_per_sec),
            auth: limiter(settings.auth_per_sec),
            failed_logins: FailedLogins::new(settings.failed_logins_per_hour),
        }
    }

    pub fn failed_logins(&self) -> &FailedLogins {
        &self.failed_logins
    }

    /// Counts a request; `Err(wait)` when it is over its budget.
    pub fn check(&self, class: Class, ip: IpAddr) -> Result<(), Duration> {
        let limiter = match class {
            Class::Api => &self.api,
            Class::Auth => &self.auth,
            Class::Unlimited => return Ok(()),
        };
        match limiter {
            Some(l) => l
                .check_key(&ip)
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
            None => Ok(()),
        }
    }

    /// Forgets addresses whose budget is full again (bounds the memory the limiters use).
    pub fn forget_idle(&self) {
        for l in [&self.api, &self.auth].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        self.failed_logins.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_over_the_budget_is_refused_with_a_wait() {
        let limits = RateLimits::new(RateLimitSettings {
            api_per_sec: 30,
            auth_per_sec: 5,
            failed_logins_per_hour: 100,
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..30 {
            assert!(limits.check(Class::Api, ip).is_ok());
        }
        let wait = limits.check(Class::Api, ip).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limits.check(Class::Api, other).is_ok(), "per address");
        for _ in 0..5 {
            assert!(limits.check(Class::Auth, ip).is_ok(), "separate budget");
        }
        assert!(limits.check(Class::Auth, ip).is_err());
        assert!(limits.check(Class::Unlimited, ip).is_ok());
    }

    #[test]
    fn the_101st_failed_login_of_an_account_locks_it_out() {
        let limits = RateLimits::new(RateLimitSettings::default());
        let f = limits.failed_logins();
        for _ in 0..FAILED_LOGINS_PER_HOUR {
            assert!(f.check("Ada@Example.com").is_ok());
            assert!(f.record_failure(" ada@example.com ").is_ok());
        }
        let wait = f.record_failure("ada@example.com").unwrap_err();
        assert!(wait > Duration::from_secs(30) && wait <= Duration::from_secs(36));
        assert!(
            f.check("ADA@example.com").is_err(),
            "locked, whatever the case"
        );
        assert!(f.check("bob@example.com").is_ok(), "per account");
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let limits = RateLimits::new(RateLimitSettings {
            api_per_sec: 0,
            auth_per_sec: 0,
            failed_logins_per_hour: 0,
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..1000 {
            assert!(limits.check(Class::Api, ip).is_ok());
            assert!(limits.check(Class::Auth, ip).is_ok());
            assert!(limits
                .failed_logins()
                .record_failure("a@example.com")
                .is_ok());
        }
    }

    #[test]
    fn paths_map_to_budgets() {
        assert_eq!(Class::of("/v1/auth/login"), Class::Auth);
        assert_eq!(Class::of("/v1/contacts"), Class::Api);
        assert_eq!(Class::of("/healthz"), Class::Unlimited);
        assert_eq!(Class::of("/metrics"), Class::Unlimited);
    }
}
