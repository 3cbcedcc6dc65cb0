//! Caller authentication: who is calling (a service) and for whom (an employee).
//!
//! Produces a typed [`Caller`] from transport facts; handlers read it from request
//! extensions and nothing in a request body can change it. Whether the named service
//! and employee exist is checked against the directory by `policy`.
//!
//! Today the only mode that authenticates anyone is the explicitly insecure
//! [`Mode::DangerTrustIdentityHeaders`], which believes the `x-ringfence-*` metadata
//! headers and is refused unless the server listens on loopback only.

use crate::policy::Principal;

/// Metadata header naming the calling service in the danger mode.
pub const SERVICE_HEADER: &str = "x-ringfence-service";
/// Metadata header naming the employee the service acts for in the danger mode.
pub const EMPLOYEE_HEADER: &str = "x-ringfence-employee";
/// Longest directory id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No authentication is configured: every request is refused.
    Disabled,
    /// Development only: believe identity headers. Loopback listeners only.
    DangerTrustIdentityHeaders,
}

impl Mode {
    /// The name recorded in the decision log and given to policies.
    pub fn method_name(self) -> &'static str {
        match self {
            Mode::Disabled => "none",
            Mode::DangerTrustIdentityHeaders => "danger-trust-identity-headers",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Directory id of the calling service.
    pub service: String,
    /// Directory id of the employee the service acts for, if any.
    pub employee: Option<String>,
    /// How the caller was authenticated.
    pub method: &'static str,
}

impl Caller {
    /// The Cedar principal: the employee when there is one, else the service.
    pub fn principal(&self) -> Principal {
        match &self.employee {
            Some(employee) => Principal::Employee(employee.clone()),
            None => Principal::Service(self.service.clone()),
        }
    }
}

/// Why a caller is not authenticated. Messages name the failed check, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server has no authentication configured.
    #[error(
        "this server has no caller authentication configured; for local development start it with --danger-trust-identity-headers"
    )]
    NotConfigured,
    /// A required header is absent.
    #[error("missing `{0}` metadata header")]
    Missing(&'static str),
    /// A header appears more than once.
    #[error("`{0}` metadata header given more than once")]
    Repeated(&'static str),
    /// A header value is not a valid directory id.
    #[error(
        "`{0}` metadata header must be 1 to 128 characters of A-Z, a-z, 0-9, `.`, `_`, `@` or `-`"
    )]
    Invalid(&'static str),
}

fn directory_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// Values of one metadata header, as the transport saw them; `None` for a value that
/// is not visible ASCII.
pub type HeaderValues<'a> = Vec<Option<&'a str>>;

/// Authenticates a caller from request metadata, given a lookup of header values.
pub fn authenticate<'a>(
    mode: Mode,
    header: impl Fn(&'static str) -> HeaderValues<'a>,
) -> Result<Caller, Error> {
    match mode {
        Mode::Disabled => Err(Error::NotConfigured),
        Mode::DangerTrustIdentityHeaders => {
            let one = |name: &'static str| -> Result<Option<&'a str>, Error> {
                let values = header(name);
                match values.as_slice() {
                    [] => Ok(None),
                    [Some(value)] if directory_id(value) => Ok(Some(value)),
                    [_] => Err(Error::Invalid(name)),
                    _ => Err(Error::Repeated(name)),
                }
            };
            let service = one(SERVICE_HEADER)?.ok_or(Error::Missing(SERVICE_HEADER))?;
            let employee = one(EMPLOYEE_HEADER)?;
            Ok(Caller {
                service: service.to_owned(),
                employee: employee.map(str::to_owned),
                method: mode.method_name(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(
        pairs: &'a [(&'static str, &'a str)],
    ) -> impl Fn(&'static str) -> HeaderValues<'a> {
        move |name| {
            pairs
                .iter()
                .filter(|(key, _)| *key == name)
                .map(|(_, value)| Some(*value))
                .collect()
        }
    }

    #[test]
    fn danger_mode_reads_service_and_employee() {
        let caller = authenticate(
            Mode::DangerTrustIdentityHeaders,
            headers(&[
                (SERVICE_HEADER, "us-support-tool"),
                (EMPLOYEE_HEADER, "alice"),
            ]),
        )
        .unwrap();
        assert_eq!(caller.principal(), Principal::Employee("alice".to_owned()));
        let service_only = authenticate(
            Mode::DangerTrustIdentityHeaders,
            headers(&[(SERVICE_HEADER, "us-signup")]),
        )
        .unwrap();
        assert_eq!(
            service_only.principal(),
            Principal::Service("us-signup".to_owned())
        );
    }

    #[test]
    fn missing_repeated_and_invalid_headers_are_refused() {
        let mode = Mode::DangerTrustIdentityHeaders;
        assert_eq!(
            authenticate(mode, headers(&[(EMPLOYEE_HEADER, "alice")])),
            Err(Error::Missing(SERVICE_HEADER))
        );
        assert_eq!(
            authenticate(
                mode,
                headers(&[
                    (SERVICE_HEADER, "a"),
                    (EMPLOYEE_HEADER, "x"),
                    (EMPLOYEE_HEADER, "y")
                ])
            ),
            Err(Error::Repeated(EMPLOYEE_HEADER))
        );
        assert_eq!(
            authenticate(
                mode,
                headers(&[(SERVICE_HEADER, "a"), (EMPLOYEE_HEADER, "Employee::\"x\"")])
            ),
            Err(Error::Invalid(EMPLOYEE_HEADER))
        );
        assert_eq!(
            authenticate(mode, |_| vec![None]),
            Err(Error::Invalid(SERVICE_HEADER))
        );
        assert_eq!(
            authenticate(Mode::Disabled, headers(&[(SERVICE_HEADER, "a")])),
            Err(Error::NotConfigured)
        );
    }
}
