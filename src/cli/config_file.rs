//! `serve --config FILE`: a TOML file whose keys are `serve`'s flags (without the
//! dashes), turned into command-line arguments before clap parses them, so that the
//! file can say everything a flag can and is checked by the same parsers. Order of
//! precedence: flags, then environment variables (`RINGFENCE_*`), then the file, then
//! the defaults. May not read anything but the file.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use toml::de::{DeTable, DeValue};

/// Environment variable naming the configuration file (like `--config`).
pub const CONFIG_ENV: &str = "RINGFENCE_CONFIG";

/// A configuration file that cannot be used; the message names the file and line.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A command line with the configuration file's keys in it.
#[derive(Debug, Default)]
pub struct Expanded {
    /// The arguments to parse.
    pub argv: Vec<OsString>,
    /// What the file set: (`--flag`, its value, `FILE:LINE`).
    origins: Vec<(String, Option<String>, String)>,
}

impl Expanded {
    /// Whether `error` is about a value the configuration file set.
    pub fn set_by_file(&self, error: &clap::Error) -> bool {
        self.origin(error).is_some()
    }

    /// `FILE:LINE` of the key `error` is about: the file set that flag, and the value
    /// refused (if the error names one) is the file's.
    fn origin(&self, error: &clap::Error) -> Option<String> {
        use clap::error::{ContextKind, ContextValue};
        let flag = match error.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => arg.split(' ').next()?.to_owned(),
            _ => return None,
        };
        let value = match error.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(value)) => Some(value.clone()),
            _ => None,
        };
        self.origins
            .iter()
            .find(|(set, set_value, _)| *set == flag && (value.is_none() || value == *set_value))
            .map(|(_, _, at)| at.clone())
    }

    /// `error` (of parsing [`Expanded::argv`]) with the file and line of the key it is
    /// about, when the file set that value; else as clap renders it.
    pub fn explain(&self, error: &clap::Error) -> String {
        let rendered = error.render().to_string();
        let message = rendered
            .trim()
            .trim_start_matches("error: ")
            .lines()
            .take_while(|line| !line.starts_with("For more information"))
            .collect::<Vec<_>>()
            .join("\n");
        match self.origin(error) {
            Some(at) => format!("{at}: {}", message.trim()),
            None => message.trim().to_owned(),
        }
    }
}

/// `argv` with the keys of the configuration file of a `serve` command inserted as
/// flags before the command line's own (which therefore win); other commands, and
/// `serve` without `--config` or `RINGFENCE_CONFIG`, unchanged.
pub fn expand(argv: Vec<OsString>) -> Result<Expanded, Error> {
    if argv.get(1).map(OsString::as_os_str) != Some(OsStr::new("serve")) {
        return Ok(Expanded {
            argv,
            origins: Vec::new(),
        });
    }
    let Some(path) = config_path(argv.get(2..).unwrap_or_default()) else {
        return Ok(Expanded {
            argv,
            origins: Vec::new(),
        });
    };
    let mut expanded: Vec<OsString> = argv.iter().take(2).cloned().collect();
    let mut origins = Vec::new();
    for (arg, flag, at) in file_args(&path)? {
        // A flag the command line gives too is the command line's alone (list flags
        // would otherwise add up).
        let given = argv.iter().skip(2).any(|given| {
            given == flag.as_str()
                || given
                    .as_encoded_bytes()
                    .starts_with(format!("{flag}=").as_bytes())
        });
        if given {
            continue;
        }
        let value = arg
            .to_str()
            .and_then(|arg| arg.split_once('='))
            .map(|(_, value)| value.to_owned());
        origins.push((flag, value, at));
        expanded.push(arg);
    }
    expanded.extend(argv.into_iter().skip(2));
    Ok(Expanded {
        argv: expanded,
        origins,
    })
}

/// The file `--config FILE` / `--config=FILE` names, else `$RINGFENCE_CONFIG`.
/// Given more than once, the last one (as clap takes it); any path, UTF-8 or not.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut found = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            found = args.next().map(PathBuf::from);
        } else if let Some(path) = arg.as_encoded_bytes().strip_prefix(b"--config=") {
            #[cfg(unix)]
            {
                found = Some(PathBuf::from(
                    <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path),
                ));
            }
            #[cfg(not(unix))]
            {
                found = std::str::from_utf8(path).ok().map(PathBuf::from);
            }
        }
    }
    found.or_else(|| {
        std::env::var_os(CONFIG_ENV)
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
    })
}

/// One flag of `serve`, as the file may set it.
struct Flag {
    long: String,
    env: Option<String>,
    takes_value: bool,
    list: bool,
}

fn serve_flags() -> Vec<Flag> {
    let command = super::Cli::command();
    let Some(serve) = command.find_subcommand("serve") else {
        return Vec::new();
    };
    serve
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?.to_owned();
            Some(Flag {
                long,
                env: arg.get_env().map(|env| env.to_string_lossy().into_owned()),
                takes_value: arg.get_action().takes_values(),
                list: arg.get_value_delimiter().is_some(),
            })
        })
        .filter(|flag| !["config", "help"].contains(&flag.long.as_str()))
        .collect()
}

/// The flags the file at `path` sets (in key order), each with its flag name and
/// `FILE:LINE`; keys whose environment variable is set are left out (the environment
/// wins over the file).
fn file_args(path: &Path) -> Result<Vec<(OsString, String, String)>, Error> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|error| Error(format!("configuration file {shown}: {error}")))?;
    let table = DeTable::parse(&text).map_err(|error| {
        Error(format!(
            "configuration file {shown} is not valid TOML: {error}"
        ))
    })?;
    let line = |offset: usize| {
        text.get(..offset)
            .map_or(1, |head| head.matches('\n').count() + 1)
    };
    let flags = serve_flags();
    let mut args = Vec::new();
    for (key, value) in table.get_ref() {
        let at = format!("{shown}:{}", line(key.span().start));
        let name = key.get_ref().as_ref();
        let Some(flag) = flags.iter().find(|flag| flag.long == name) else {
            let hint = flags
                .iter()
                .find(|flag| flag.long == name.replace('_', "-"))
                .map(|flag| format!(" (did you mean `{}`?)", flag.long))
                .unwrap_or_default();
            return Err(Error(format!(
                "{at}: unknown key `{name}`{hint}: the keys are `serve`'s flags without the dashes (`ringfence serve --help`)"
            )));
        };
        if flag
            .env
            .as_deref()
            .is_some_and(|env| std::env::var_os(env).is_some())
        {
            continue;
        }
        let wrong = |expected: &str| Error(format!("{at}: `{name}` must be {expected}"));
        let mut push = |value: Option<String>| {
            let arg = match value {
                None => format!("--{name}"),
                Some(value) => format!("--{name}={value}"),
            };
            args.push((OsString::from(arg), format!("--{name}"), at.clone()));
        };
        match (value.get_ref(), flag.takes_value) {
            (DeValue::Boolean(set), false) => {
                if *set {
                    push(None);
                }
            }
            (_, false) => return Err(wrong("true or false")),
            (DeValue::String(text), true) => push(Some(text.to_string())),
            (DeValue::Integer(number), true) if number.radix() == 10 => {
                push(Some(number.as_str().to_owned()));
            }
            (DeValue::Array(items), true) if flag.list => {
                let mut values = Vec::new();
                for item in items {
                    match item.get_ref() {
                        DeValue::String(text) => values.push(text.to_string()),
                        _ => return Err(wrong("a list of strings")),
                    }
                }
                push(Some(values.join(",")));
            }
            (DeValue::Table(_), true) => {
                return Err(wrong(
                    "a value: every key sits at the top level of the file, without sections",
                ));
            }
            (_, true) if flag.list => return Err(wrong("a string or a list of strings")),
            (_, true) => return Err(wrong("a string or a decimal integer")),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringfence.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn every_serve_flag_has_an_environment_variable() {
        for flag in serve_flags() {
            let expected = format!("RINGFENCE_{}", flag.long.to_uppercase().replace('-', "_"));
            assert_eq!(
                flag.env.as_deref(),
                Some(expected.as_str()),
                "--{}",
                flag.long
            );
        }
    }

    #[test]
    fn keys_become_flags_before_the_command_line() {
        let (_dir, path) = write(
            "listen = \"127.0.0.1:7000\"\njurisdictions = [\"US\", \"SG\"]\nmax-message-bytes = 65536\ndev = true\nno-watch-policies = false\n",
        );
        let argv: Vec<OsString> = ["ringfence", "serve", "--config"]
            .iter()
            .map(OsString::from)
            .chain([
                path.clone().into_os_string(),
                "--listen=127.0.0.1:7001".into(),
            ])
            .collect();
        let expanded = expand(argv).unwrap().argv;
        let shown: Vec<_> = expanded
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let mut from_file = shown[2..5].to_vec();
        from_file.sort();
        assert_eq!(&shown[..2], ["ringfence", "serve"]);
        // The command line's --listen replaces the file's; `false` adds nothing.
        assert_eq!(
            from_file,
            [
                "--dev",
                "--jurisdictions=US,SG",
                "--max-message-bytes=65536",
            ]
        );
        assert_eq!(
            &shown[5..],
            [
                "--config",
                &path.display().to_string(),
                "--listen=127.0.0.1:7001"
            ]
        );
        // Other commands are left alone.
        let argv = vec![
            OsString::from("ringfence"),
            "keys".into(),
            "--config".into(),
        ];
        assert_eq!(expand(argv.clone()).unwrap().argv, argv);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors_with_line_numbers() {
        for (text, expected) in [
            (
                "listen = \"127.0.0.1:1\"\n\nlisten_addr = 1\n",
                ":3: unknown key `listen_addr`",
            ),
            (
                "max_message_bytes = 1\n",
                "(did you mean `max-message-bytes`?)",
            ),
            ("\ndev = \"yes\"\n", ":2: `dev` must be true or false"),
            (
                "listen = 1.5\n",
                ":1: `listen` must be a string or a decimal integer",
            ),
            ("[tls]\ncert = \"a\"\n", "unknown key `tls`"),
            (
                "jurisdictions = [1]\n",
                "`jurisdictions` must be a list of strings",
            ),
            ("listen = \n", "is not valid TOML"),
        ] {
            let (_dir, path) = write(text);
            let error = file_args(&path).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("ringfence.toml"), "{error}");
        }
    }

    #[test]
    fn the_command_line_replaces_a_list_and_the_last_config_counts() {
        let (_dir, first) = write("jurisdictions = [\"US\", \"SG\"]\n");
        let (_other, second) = write("listen = \"127.0.0.1:7002\"\n");
        let argv: Vec<OsString> = ["ringfence", "serve", "--config"]
            .iter()
            .map(OsString::from)
            .chain([
                first.into_os_string(),
                "--jurisdictions".into(),
                "EU".into(),
            ])
            .collect();
        let expanded = expand(argv).unwrap().argv;
        assert!(
            !expanded
                .iter()
                .any(|arg| arg.to_string_lossy().contains("US")),
            "{expanded:?}"
        );
        let argv: Vec<OsString> = ["ringfence", "serve", "--config", "missing.toml"]
            .iter()
            .map(OsString::from)
            .chain([OsString::from(format!("--config={}", second.display()))])
            .collect();
        let expanded = expand(argv).unwrap().argv;
        assert!(
            expanded.iter().any(|arg| arg == "--listen=127.0.0.1:7002"),
            "{expanded:?}"
        );
    }
}
