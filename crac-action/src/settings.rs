//! Settings from the environment (CRIU passes its own environment on to the script).

use std::time::Duration;

/// Seconds crac-action waits for all agents at one step (default 30).
pub const TIMEOUT_ENV: &str = crac_protocol::env::ACTION_TIMEOUT;
/// `1` makes "no agent in the tree" an error instead of a log line.
pub const REQUIRE_AGENT_ENV: &str = crac_protocol::env::REQUIRE_AGENT;
/// Seconds the watcher waits for CRIU to finish a dump (default 3600).
pub const WATCHER_TIMEOUT_ENV: &str = crac_protocol::env::WATCHER_TIMEOUT;

/// crac-action's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The most one step waits for all agents together.
    pub timeout: Duration,
    /// Whether a tree with no agent is an error.
    pub require_agent: bool,
    /// The most the watcher waits for CRIU to exit.
    pub watcher_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            timeout: Duration::from_secs(30),
            require_agent: false,
            watcher_timeout: Duration::from_secs(3600),
        }
    }
}

impl Settings {
    /// Reads the settings from `vars`.
    ///
    /// # Errors
    ///
    /// A line naming the variable and what it should hold.
    pub fn from_vars(vars: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let mut settings = Settings::default();
        if let Some(raw) = vars(TIMEOUT_ENV) {
            settings.timeout = seconds(TIMEOUT_ENV, &raw)?;
        }
        if let Some(raw) = vars(WATCHER_TIMEOUT_ENV) {
            settings.watcher_timeout = seconds(WATCHER_TIMEOUT_ENV, &raw)?;
        }
        if let Some(raw) = vars(REQUIRE_AGENT_ENV) {
            settings.require_agent = match raw.trim() {
                "1" | "true" | "yes" => true,
                "" | "0" | "false" | "no" => false,
                other => return Err(format!("{REQUIRE_AGENT_ENV}={other:?}: expected 1 or 0")),
            };
        }
        Ok(settings)
    }

    /// Reads the settings from the process environment.
    ///
    /// # Errors
    ///
    /// As [`from_vars`](Self::from_vars).
    pub fn from_env() -> Result<Settings, String> {
        Settings::from_vars(|name| std::env::var(name).ok())
    }
}

fn seconds(name: &str, raw: &str) -> Result<Duration, String> {
    raw.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            format!("{name}={raw:?}: expected a number of seconds above 0, e.g. 30 or 2.5")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Settings, String> {
        Settings::from_vars(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse(&[]).unwrap(), Settings::default());
        let s = parse(&[(TIMEOUT_ENV, "2.5"), (REQUIRE_AGENT_ENV, "1")]).unwrap();
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(s.require_agent);
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        assert_eq!(
            parse(&[(TIMEOUT_ENV, "soon")]).unwrap_err(),
            "CRAC_ACTION_TIMEOUT=\"soon\": expected a number of seconds above 0, e.g. 30 or 2.5"
        );
        assert_eq!(
            parse(&[(REQUIRE_AGENT_ENV, "maybe")]).unwrap_err(),
            "CRAC_REQUIRE_AGENT=\"maybe\": expected 1 or 0"
        );
    }
}
