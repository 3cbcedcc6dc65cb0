//! `keys shred`: crypto-shredding a data subject through a running server's KeyAdmin
//! service, or offline with the server stopped. May not touch keys.

use std::process::ExitCode;

use ringfence::keyadmin;
use ringfence::pb;
use ringfence::record::{Jurisdiction, SubjectId};

use super::super::admin_client::ServerArgs;
use super::super::{EXIT_FAILURE, fail};
use super::KeyArgs;

/// `keys shred`: through `--server`'s KeyAdmin service, or offline.
pub(super) fn shred(
    args: &KeyArgs,
    server: &ServerArgs,
    subject: &SubjectId,
    jurisdictions: &[Jurisdiction],
) -> ExitCode {
    let print = |outcomes: Vec<(String, String)>| {
        for (jurisdiction, outcome) in outcomes {
            println!("{jurisdiction}\t{outcome}");
        }
    };
    match server.connect(&args.data.data_dir) {
        Ok(Some(remote)) => {
            let message = pb::ShredSubjectRequest {
                subject_id: subject.as_str().to_owned(),
                jurisdictions: jurisdictions
                    .iter()
                    .map(|j| j.as_str().to_owned())
                    .collect(),
                purpose: server.purpose.clone(),
                ticket: server.ticket.clone(),
            };
            match remote.call(message, |mut client, request| async move {
                client.shred_subject(request).await
            }) {
                Ok(response) => {
                    print(
                        response
                            .jurisdictions
                            .into_iter()
                            .map(|shred| (shred.jurisdiction, shred.outcome))
                            .collect(),
                    );
                    println!("request {}", response.request_id);
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
        Ok(None) => {
            let master = match args.master(false) {
                Ok(master) => master,
                Err(error) => return fail(EXIT_FAILURE, error),
            };
            match keyadmin::shred_offline(
                &args.paths(),
                "ringfence keys shred",
                &master,
                subject,
                jurisdictions,
            ) {
                Ok(outcomes) => {
                    print(
                        outcomes
                            .iter()
                            .map(|o| (o.jurisdiction().as_str().to_owned(), o.as_str().to_owned()))
                            .collect(),
                    );
                    ExitCode::SUCCESS
                }
                Err(keyadmin::Error::Log(error @ ringfence::audit::Error::Locked { .. })) => fail(
                    EXIT_FAILURE,
                    format!(
                        "{error}: a server runs on this data directory (it caches subject secrets); shred through it with --server"
                    ),
                ),
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
        Err(error) => fail(EXIT_FAILURE, error),
    }
}
