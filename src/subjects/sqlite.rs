//! The embedded subject store: SQLite (`subjects.db` in the data directory) in WAL
//! mode with `synchronous=FULL` and `secure_delete`, driven by one thread that runs
//! every queued operation of a moment in one transaction (group commit).
//!
//! Holds sealed secrets only; sealing is [`super::Subjects`]' business. The SQL is
//! portable (`INSERT ... ON CONFLICT DO NOTHING`, no SQLite-only types) so that the
//! PostgreSQL store of a later issue can share it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{Error, Row, ShredOutcome, StoreFuture, SubjectStore};
use crate::record::{Jurisdiction, SubjectId};

/// File name of the subject store in the data directory.
pub const SUBJECTS_FILE: &str = "subjects.db";
/// The store's format, kept in its `store_meta` table.
pub const SUBJECTS_FORMAT: &str = "ringfence-subjects/1";
/// Most operations committed in one transaction.
const BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS store_meta (
  name TEXT NOT NULL PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS subjects (
  jurisdiction TEXT NOT NULL,
  subject TEXT NOT NULL,
  sealed BLOB,
  created_at TEXT NOT NULL,
  shredded_at TEXT,
  PRIMARY KEY (jurisdiction, subject)
);
CREATE INDEX IF NOT EXISTS subjects_by_subject ON subjects (subject);
";

enum Op {
    Get {
        jurisdiction: Jurisdiction,
        subject: SubjectId,
        reply: oneshot::Sender<Result<Option<Row>, Error>>,
    },
    Insert {
        jurisdiction: Jurisdiction,
        subject: SubjectId,
        sealed: Vec<u8>,
        created_at: String,
        reply: oneshot::Sender<Result<Row, Error>>,
    },
    Shred {
        subject: SubjectId,
        jurisdictions: Vec<Jurisdiction>,
        at: String,
        reply: oneshot::Sender<Result<Vec<ShredOutcome>, Error>>,
    },
}

/// The SQLite subject store. Dropping it stops its thread after the queued work.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    queue: mpsc::Sender<Op>,
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |error| Error::Store(format!("subject store `{}`: {error}", path.display()))
}

/// Opens a connection and applies the durability settings.
fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, Error> {
    let connection = Connection::open_with_flags(path, flags).map_err(sql(path))?;
    connection
        .busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql(path))?;
    Ok(connection)
}

/// Reads and checks an existing store without writing to it: its integrity, format
/// and the check values of the master key that sealed it.
pub fn inspect(path: &Path) -> Result<BTreeMap<String, String>, Error> {
    let connection = connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let check: String = connection
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(|error| Error::Corrupt(path.to_owned(), error.to_string()))?;
    if check != "ok" {
        return Err(Error::Corrupt(path.to_owned(), check));
    }
    let mut statement = connection
        .prepare("SELECT name, value FROM store_meta")
        .map_err(|error| Error::Corrupt(path.to_owned(), error.to_string()))?;
    let meta = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .and_then(|rows| rows.collect::<Result<BTreeMap<String, String>, _>>())
        .map_err(|error| Error::Corrupt(path.to_owned(), error.to_string()))?;
    match meta.get("format").map(String::as_str) {
        Some(SUBJECTS_FORMAT) => Ok(meta),
        Some(other) => Err(Error::Corrupt(
            path.to_owned(),
            format!("unsupported format `{}`", crate::record::shown(other)),
        )),
        None => Err(Error::Corrupt(
            path.to_owned(),
            "no format recorded".to_owned(),
        )),
    }
}

/// Whether `path` holds a store: an empty file (a first start interrupted before the
/// store was made) counts as none, unless a write-ahead log or journal lies beside it.
pub fn exists(path: &Path) -> bool {
    let beside = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        Path::new(&name).exists()
    };
    std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > 0)
        || beside("-wal")
        || beside("-journal")
}

/// Opens (creating, readable by its owner only) the store read-write with WAL,
/// `synchronous=FULL` and `secure_delete` on.
pub fn open_connection(path: &Path) -> Result<Connection, Error> {
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|error| {
                Error::Store(format!(
                    "cannot create the subject store `{}`: {error}",
                    path.display()
                ))
            })?;
    }
    let connection = connect(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )?;
    let set = |name: &str, value: &str| {
        connection
            .pragma_update(None, name, value)
            .map_err(sql(path))
    };
    set("journal_mode", "WAL")?;
    set("synchronous", "FULL")?;
    set("secure_delete", "ON")?;
    connection.execute_batch(SCHEMA).map_err(sql(path))?;
    connection
        .execute(
            "INSERT INTO store_meta (name, value) VALUES ('format', ?1) ON CONFLICT DO NOTHING",
            params![SUBJECTS_FORMAT],
        )
        .map_err(sql(path))?;
    Ok(connection)
}

/// Records check values (`check:<J>`) the store did not have yet.
pub fn record_checks(
    connection: &Connection,
    path: &Path,
    checks: &BTreeMap<String, String>,
) -> Result<(), Error> {
    for (name, value) in checks {
        connection
            .execute(
                "INSERT INTO store_meta (name, value) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![name, value],
            )
            .map_err(sql(path))?;
    }
    Ok(())
}

impl SqliteStore {
    /// Starts the store's thread on an opened connection (see [`open_connection`]).
    pub fn start(path: &Path, connection: Connection) -> Result<Self, Error> {
        let (queue, receiver) = mpsc::channel();
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("subject-store".to_owned())
            .spawn(move || run(connection, &thread_path, &receiver))
            .map_err(|error| Error::Store(format!("cannot start the subject store: {error}")))?;
        Ok(Self {
            path: path.to_owned(),
            queue,
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send<T: Send + 'static>(
        &self,
        op: Op,
        reply: oneshot::Receiver<Result<T, Error>>,
    ) -> StoreFuture<T> {
        let sent = self.queue.send(op).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(Error::Store("the subject store has stopped".to_owned()));
            }
            reply
                .await
                .unwrap_or_else(|_| Err(Error::Store("the subject store has stopped".to_owned())))
        })
    }
}

impl SubjectStore for SqliteStore {
    fn get(&self, jurisdiction: &Jurisdiction, subject: &SubjectId) -> StoreFuture<Option<Row>> {
        let (reply, receiver) = oneshot::channel();
        let op = Op::Get {
            jurisdiction: jurisdiction.clone(),
            subject: subject.clone(),
            reply,
        };
        self.send(op, receiver)
    }

    fn insert_if_absent(
        &self,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
        sealed: Vec<u8>,
        created_at: String,
    ) -> StoreFuture<Row> {
        let (reply, receiver) = oneshot::channel();
        let op = Op::Insert {
            jurisdiction: jurisdiction.clone(),
            subject: subject.clone(),
            sealed,
            created_at,
            reply,
        };
        self.send(op, receiver)
    }

    fn shred(
        &self,
        subject: &SubjectId,
        jurisdictions: &[Jurisdiction],
        at: String,
    ) -> StoreFuture<Vec<ShredOutcome>> {
        let (reply, receiver) = oneshot::channel();
        let op = Op::Shred {
            subject: subject.clone(),
            jurisdictions: jurisdictions.to_vec(),
            at,
            reply,
        };
        self.send(op, receiver)
    }
}

/// The store's thread: takes what is queued (at most [`BATCH`]), runs it in one
/// transaction, commits (one fsync of the WAL), then answers every operation. Each
/// operation runs in a savepoint of its own: one that fails leaves no partial change
/// (a shred of several jurisdictions is all or nothing) and the others commit; when
/// SQLite rolls the whole transaction back itself (disk full, I/O error), every
/// operation of the batch fails.
fn run(mut connection: Connection, path: &Path, receiver: &mpsc::Receiver<Op>) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match receiver.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let shredded = batch.iter().any(|op| matches!(op, Op::Shred { .. }));
        let mut answers = Vec::with_capacity(batch.len());
        let committed = (|| -> Result<(), Error> {
            let mut transaction = connection.transaction().map_err(sql(path))?;
            for op in &batch {
                let mut savepoint = transaction.savepoint().map_err(sql(path))?;
                let answer = execute(&savepoint, path, op);
                if answer.is_ok() {
                    savepoint.commit().map_err(sql(path))?;
                } else {
                    // Undone explicitly, so that a failure to undo fails the batch.
                    savepoint.rollback().map_err(sql(path))?;
                    drop(savepoint);
                    if transaction.is_autocommit() {
                        return Err(Error::Store(format!(
                            "subject store `{}`: the transaction was rolled back",
                            path.display()
                        )));
                    }
                }
                answers.push(answer);
            }
            transaction.commit().map_err(sql(path))
        })();
        if let Err(error) = &committed {
            tracing::error!(%error, operations = batch.len(), "subject store: a batch failed; every operation of it is refused");
        }
        // Operations the batch did not reach are answered with its error too.
        while answers.len() < batch.len() {
            answers.push(Answer::Row(Err(Error::Store("not run".to_owned()))));
        }
        if shredded && committed.is_ok() {
            // Copy the zeroed pages into the database file and empty the WAL, so the
            // sealed secrets are gone from both (docs/crypto.md, "Shredding").
            checkpoint(&connection);
        }
        for (op, answer) in batch.into_iter().zip(answers) {
            let failed = |error: &Error| Error::Store(error.to_string());
            match (op, answer, &committed) {
                (Op::Get { reply, .. }, Answer::Row(row), Ok(())) => {
                    let _ = reply.send(row);
                }
                (Op::Insert { reply, .. }, Answer::Row(row), Ok(())) => {
                    let _ = reply.send(row.and_then(|row| {
                        row.ok_or_else(|| Error::Store("inserted row not found".to_owned()))
                    }));
                }
                (Op::Shred { reply, .. }, Answer::Shred(outcome), Ok(())) => {
                    let _ = reply.send(outcome);
                }
                (Op::Get { reply, .. }, _, Err(error)) => {
                    let _ = reply.send(Err(failed(error)));
                }
                (Op::Insert { reply, .. }, _, Err(error)) => {
                    let _ = reply.send(Err(failed(error)));
                }
                (Op::Shred { reply, .. }, _, Err(error)) => {
                    let _ = reply.send(Err(failed(error)));
                }
                (Op::Get { reply, .. }, Answer::Shred(_), Ok(())) => {
                    let _ = reply.send(Err(Error::Store("mismatched answer".to_owned())));
                }
                (Op::Insert { reply, .. }, Answer::Shred(_), Ok(())) => {
                    let _ = reply.send(Err(Error::Store("mismatched answer".to_owned())));
                }
                (Op::Shred { reply, .. }, Answer::Row(_), Ok(())) => {
                    let _ = reply.send(Err(Error::Store("mismatched answer".to_owned())));
                }
            }
        }
    }
}

enum Answer {
    Row(Result<Option<Row>, Error>),
    Shred(Result<Vec<ShredOutcome>, Error>),
}

impl Answer {
    fn is_ok(&self) -> bool {
        match self {
            Answer::Row(result) => result.is_ok(),
            Answer::Shred(result) => result.is_ok(),
        }
    }
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`, warning when it could not complete (another
/// connection reading, an I/O error): the WAL then keeps old pages until the next one.
fn checkpoint(connection: &Connection) {
    let result = connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    match result {
        Ok(0) => {}
        Ok(_) => tracing::warn!(
            "subject store: the checkpoint after shredding was blocked by another connection; the WAL keeps old pages until the next checkpoint"
        ),
        Err(error) => tracing::warn!(
            %error,
            "subject store: the checkpoint after shredding failed; the WAL keeps old pages until the next checkpoint"
        ),
    }
}

fn read_row(
    connection: &Connection,
    path: &Path,
    jurisdiction: &Jurisdiction,
    subject: &SubjectId,
) -> Result<Option<Row>, Error> {
    connection
        .prepare_cached(
            "SELECT sealed, shredded_at FROM subjects WHERE jurisdiction = ?1 AND subject = ?2",
        )
        .and_then(|mut statement| {
            statement
                .query_row(params![jurisdiction.as_str(), subject.as_str()], |row| {
                    Ok((
                        row.get::<_, Option<Vec<u8>>>(0)?,
                        row.get::<_, Option<String>>(1)?,
                    ))
                })
                .optional()
        })
        .map_err(sql(path))
        .map(|found| {
            found.map(|(sealed, shredded_at)| match (sealed, shredded_at) {
                (Some(sealed), None) => Row::Live(sealed),
                (_, at) => Row::Shredded {
                    at: at.unwrap_or_default(),
                },
            })
        })
}

fn execute(connection: &Connection, path: &Path, op: &Op) -> Answer {
    match op {
        Op::Get {
            jurisdiction,
            subject,
            ..
        } => Answer::Row(read_row(connection, path, jurisdiction, subject)),
        Op::Insert {
            jurisdiction,
            subject,
            sealed,
            created_at,
            ..
        } => Answer::Row(
            connection
                .prepare_cached(
                    "INSERT INTO subjects (jurisdiction, subject, sealed, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                )
                .and_then(|mut statement| {
                    statement.execute(params![
                        jurisdiction.as_str(),
                        subject.as_str(),
                        sealed,
                        created_at
                    ])
                })
                .map_err(sql(path))
                .and_then(|_| read_row(connection, path, jurisdiction, subject)),
        ),
        Op::Shred {
            subject,
            jurisdictions,
            at,
            ..
        } => Answer::Shred(
            jurisdictions
                .iter()
                .map(|jurisdiction| {
                    let before = read_row(connection, path, jurisdiction, subject)?;
                    let outcome = match before {
                        Some(Row::Shredded { at }) => ShredOutcome::AlreadyShredded {
                            jurisdiction: jurisdiction.clone(),
                            at,
                        },
                        Some(Row::Live(_)) => {
                            connection
                                .execute(
                                    "UPDATE subjects SET sealed = NULL, shredded_at = ?3 WHERE jurisdiction = ?1 AND subject = ?2",
                                    params![jurisdiction.as_str(), subject.as_str(), at],
                                )
                                .map_err(sql(path))?;
                            ShredOutcome::Shredded {
                                jurisdiction: jurisdiction.clone(),
                            }
                        }
                        None => {
                            // A tombstone, so that no secret is created for the
                            // subject later and its absence reads as shredded.
                            connection
                                .execute(
                                    "INSERT INTO subjects (jurisdiction, subject, sealed, created_at, shredded_at) VALUES (?1, ?2, NULL, ?3, ?3)",
                                    params![jurisdiction.as_str(), subject.as_str(), at],
                                )
                                .map_err(sql(path))?;
                            ShredOutcome::NoSecret {
                                jurisdiction: jurisdiction.clone(),
                            }
                        }
                    };
                    Ok(outcome)
                })
                .collect(),
        ),
    }
}

/// Re-seals every live secret with `reseal` in one transaction and replaces the
/// check values (for `keys rotate-master`), reading the rows in pages so that memory
/// stays bounded however many subjects there are. Returns how many were re-sealed.
pub fn reseal_all(
    connection: &mut Connection,
    path: &Path,
    mut reseal: impl FnMut(&str, &str, &[u8]) -> Result<Vec<u8>, Error>,
    checks: &BTreeMap<String, String>,
) -> Result<u64, Error> {
    const PAGE: i64 = 10_000;
    let transaction = connection.transaction().map_err(sql(path))?;
    let mut count = 0u64;
    let mut after = (String::new(), String::new());
    loop {
        let rows: Vec<(String, String, Vec<u8>)> = {
            let mut statement = transaction
                .prepare_cached(
                    "SELECT jurisdiction, subject, sealed FROM subjects WHERE sealed IS NOT NULL AND (jurisdiction, subject) > (?1, ?2) ORDER BY jurisdiction, subject LIMIT ?3",
                )
                .map_err(sql(path))?;
            statement
                .query_map(params![after.0, after.1, PAGE], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .and_then(|rows| rows.collect::<Result<_, _>>())
                .map_err(sql(path))?
        };
        let Some((last_jurisdiction, last_subject, _)) = rows.last() else {
            break;
        };
        after = (last_jurisdiction.clone(), last_subject.clone());
        for (jurisdiction, subject, sealed) in rows {
            let resealed = reseal(&jurisdiction, &subject, &sealed)?;
            transaction
                .prepare_cached(
                    "UPDATE subjects SET sealed = ?3 WHERE jurisdiction = ?1 AND subject = ?2",
                )
                .and_then(|mut statement| {
                    statement.execute(params![jurisdiction, subject, resealed])
                })
                .map_err(sql(path))?;
            count += 1;
        }
    }
    for (name, value) in checks {
        transaction
            .execute(
                "INSERT INTO store_meta (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )
            .map_err(sql(path))?;
    }
    transaction.commit().map_err(sql(path))?;
    checkpoint(connection);
    Ok(count)
}
