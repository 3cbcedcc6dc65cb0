use super::*;

fn headers<'a>(pairs: &'a [(&'static str, &'a str)]) -> impl Fn(&'static str) -> HeaderValues<'a> {
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
        &Mode::DangerTrustIdentityHeaders,
        None,
        headers(&[
            (SERVICE_HEADER, "us-support-tool"),
            (EMPLOYEE_HEADER, "alice"),
        ]),
    )
    .unwrap();
    assert_eq!(caller.principal(), Principal::Employee("alice".to_owned()));
    let service_only = authenticate(
        &Mode::DangerTrustIdentityHeaders,
        None,
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
    let mode = &Mode::DangerTrustIdentityHeaders;
    assert_eq!(
        authenticate(mode, None, headers(&[(EMPLOYEE_HEADER, "alice")])),
        Err(Error::Missing(SERVICE_HEADER))
    );
    assert_eq!(
        authenticate(
            mode,
            None,
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
            None,
            headers(&[(SERVICE_HEADER, "a"), (EMPLOYEE_HEADER, "Employee::\"x\"")])
        ),
        Err(Error::Invalid(EMPLOYEE_HEADER))
    );
    assert_eq!(
        authenticate(mode, None, |_| vec![None]),
        Err(Error::Invalid(SERVICE_HEADER))
    );
    assert_eq!(
        authenticate(&Mode::Disabled, None, headers(&[(SERVICE_HEADER, "a")])),
        Err(Error::NotConfigured)
    );
}
