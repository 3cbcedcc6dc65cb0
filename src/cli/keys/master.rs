//! `keys rotate-master`: re-sealing the keyring and the subject store under a new
//! master key, offline, and checking the result. May not decide or serve.

use std::path::Path;
use std::process::ExitCode;

use ringfence::keyadmin;
use ringfence::keys::{self, Keyring, MASTER_KEY_ENV, MasterKeyPolicy};

use super::super::{EXIT_FAILURE, fail};
use super::{KeyArgs, NEW_MASTER_KEY_ENV, report, run_change_with};

/// The new master key of `rotate-master`: a file, else the environment.
fn new_master(file: Option<&Path>) -> Result<keys::LocalMasterKey, keys::Error> {
    if let Some(path) = file {
        return keys::load_master_key(None, Some(path), Path::new("."), MasterKeyPolicy::default());
    }
    let text = std::env::var(NEW_MASTER_KEY_ENV)
        .map(keys::MasterKeyText::new)
        .map_err(|_| {
            keys::Error::Refused(format!(
                "no new master key: pass --new-master-key-file or set {NEW_MASTER_KEY_ENV}"
            ))
        })?;
    Ok(keys::LocalMasterKey::new(
        keys::parse_master_key(text.expose(), NEW_MASTER_KEY_ENV)?,
        keys::MasterKeyOrigin::Variable(NEW_MASTER_KEY_ENV),
    ))
}

/// `keys rotate-master`: refuses a new key that already opens the keyring, re-seals
/// under the new key, then checks that the new key opens the saved keyring and the old
/// one does not.
pub(super) fn rotate_master(args: &KeyArgs, new_master_key_file: Option<&Path>) -> ExitCode {
    let new = match new_master(new_master_key_file) {
        Ok(new) => new,
        Err(error) => return fail(EXIT_FAILURE, error),
    };
    let old = match args.master(false) {
        Ok(old) => old,
        Err(error) => return fail(EXIT_FAILURE, error),
    };
    let path = args.data.data_dir.join(keys::KEYRING_FILE);
    if Keyring::open(&path, &new).is_ok() {
        return fail(
            EXIT_FAILURE,
            format!(
                "the new master key ({}) already opens `{}`: it is the current one; nothing was changed",
                keys::MasterKeySource::describe(&new),
                path.display()
            ),
        );
    }
    // The keyring as it was, to re-seal the subject store from (under both locks,
    // just before the re-sealed keyring is saved).
    let old_keyring = std::cell::RefCell::new(None);
    let store_resealed = std::cell::Cell::new(false);
    let result = run_change_with(
        args,
        "ringfence keys rotate-master",
        |path, master| {
            let mut keyring = Keyring::open(path, master)?;
            let before = keyring.states();
            *old_keyring.borrow_mut() = Some(keyring.clone());
            let events = keyring.reseal(&new)?;
            Ok((before, keyring, events))
        },
        Box::new(|new_keyring: &Keyring| {
            let Some(old) = old_keyring.borrow_mut().take() else {
                return Ok(());
            };
            match ringfence::subjects::reseal_store(&args.data.data_dir, &old, new_keyring) {
                Ok(Some(count)) => {
                    store_resealed.set(true);
                    println!("re-sealed {count} subject secrets in the subject store");
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(error) => Err(keyadmin::Error::Other(format!(
                    "the subject store could not be re-sealed ({error}); nothing was changed"
                ))),
            }
        }),
    );
    let code = report(result, "the keyring holds no keys: nothing to re-seal");
    if code != ExitCode::SUCCESS {
        if store_resealed.get() && Keyring::open(&path, &new).is_err() {
            eprintln!(
                "error: the subject store is already sealed under the NEW master key, the keyring not yet: keep both keys and run `keys rotate-master` again with them to finish (serve refuses to start until then)"
            );
        }
        return code;
    }
    if let Err(error) = Keyring::open(&path, &new) {
        return fail(
            EXIT_FAILURE,
            format!("the re-sealed keyring does not open with the new master key: {error}"),
        );
    }
    match Keyring::open(&path, &old) {
        Err(keys::Error::WrongMasterKey { .. }) => {}
        other => {
            return fail(
                EXIT_FAILURE,
                format!(
                    "the old master key should open nothing of the re-sealed keyring, but opening it gave: {}",
                    other
                        .map(|_| "success".to_owned())
                        .unwrap_or_else(|e| e.to_string())
                ),
            );
        }
    }
    println!(
        "re-sealed under {}; checked: the old master key opens nothing of `{}` (older copies of the file, e.g. in backups, still open with it: see docs/crypto.md, \"Rotating the master key\")",
        keys::MasterKeySource::describe(&new),
        path.display()
    );
    if new_master_key_file.is_none() {
        eprintln!(
            "warning: the new master key came from {NEW_MASTER_KEY_ENV} and nothing stored it: it is the only key that opens the keyring now; store it where `serve` reads it (--master-key-file or {MASTER_KEY_ENV}) before you unset it"
        );
    }
    if let keys::MasterKeyOrigin::Development { path: dev_key, .. } = old.origin() {
        // It opens nothing any more (checked above), and left in place it would be
        // picked up first by commands allowed to use it.
        match std::fs::remove_file(dev_key) {
            Ok(()) => println!("removed the development master key `{}`", dev_key.display()),
            Err(error) => eprintln!(
                "warning: cannot remove the development master key `{}` ({error}); it opens nothing now: delete it",
                dev_key.display()
            ),
        }
    }
    ExitCode::SUCCESS
}
