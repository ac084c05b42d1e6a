//! Configuration files of `pixflow serve` (`--config FILE`, `pixflow config check FILE`).
//!
//! A file is one flat YAML mapping (JSON is YAML too) whose keys are the long names of
//! `serve`'s flags, in `kebab-case` as on the command line or in `snake_case`. The keys are
//! never listed here: they come from clap's `Command`, so a new flag is a new key. Each value is
//! rendered to the argument string(s) the flag would take and run through that argument's own
//! value parser, so a file is checked exactly as the command line is, and every problem is
//! reported with its field and, where the YAML parser knows it, its line and column.
//!
//! Precedence (flags > environment > file > built-in defaults) comes from clap too: the command
//! line is parsed once, the file's value is appended for every argument whose value came from a
//! default or nowhere, and the result is parsed again. Values of secrets (tokens, keys) never
//! appear in a message or in the printed settings.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use yaml_serde::Value;

/// The subcommand whose flags a file sets.
const SERVE: &str = "serve";
/// The argument naming the file; it cannot be set inside one.
const CONFIG: &str = "config";
/// What secrets are shown as.
const REDACTED: &str = "<redacted>";

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column in the file, where known.
    pub at: Option<(usize, usize)>,
    /// The key (a flag's long name) the problem is about, if any.
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    fn new(field: Option<&str>, message: impl Into<String>) -> Problem {
        Problem { at: None, field: field.map(str::to_owned), message: message.into() }
    }

    /// `FILE:LINE:COL: field `name`: problem`, leaving out what is not known.
    pub fn line(&self, file: &str) -> String {
        let mut out = file.to_owned();
        if let Some((line, column)) = self.at {
            out.push_str(&format!(":{line}:{column}"));
        }
        out.push_str(": ");
        if let Some(field) = &self.field {
            out.push_str(&format!("field `{field}`: "));
        }
        out.push_str(&self.message);
        out
    }
}

/// A file's settings that passed every check, as command-line arguments.
#[derive(Debug, Default)]
pub struct Settings {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The clap id of the argument.
    id: String,
    /// The argument strings (`--long=value`, `--long`) the file's value renders to.
    args: Vec<String>,
}

/// Reads a file, or standard input for `-`.
pub fn read(path: &Path) -> Result<String, Problem> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text)
    } else {
        std::fs::read_to_string(path)
    };
    text.map_err(|e| Problem::new(None, format!("cannot be read: {e}")))
}

/// Checks a file against the `serve` subcommand of `root` and returns its settings as arguments;
/// on any problem, every problem.
pub fn parse(text: &str, root: &Command) -> Result<Settings, Vec<Problem>> {
    let doc: Value = match yaml_serde::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            let message = e.to_string();
            // The parser's message repeats the location; keep the part before it.
            let message = message.split(" at line ").next().unwrap_or(&message);
            let mut problem = Problem::new(None, format!("not valid YAML: {message}"));
            problem.at = e.location().map(|l| (l.line(), l.column()));
            // A value the parser cannot hold (an integer beyond 128 bits) is named by its path,
            // and the message quotes it: name the field, and quote no secret.
            if let Some((path, rest)) = message.split_once(": ")
                && !path.is_empty()
                && !path.contains(' ')
            {
                let field = path.split(['.', '[']).next().unwrap_or(path);
                let secret = find_arg(root, field).map_or_else(|_| secret_name(field), is_secret);
                problem.field = Some(field.to_owned());
                problem.message = if secret { "not a valid value (not shown)".to_owned() } else { rest.to_owned() };
            }
            return Err(vec![problem]);
        }
    };
    let map = match doc {
        // An empty file sets nothing.
        Value::Null => return Ok(Settings::default()),
        Value::Mapping(map) => map,
        _ => {
            return Err(vec![Problem::new(
                None,
                "expected a mapping of `pixflow serve` flag names to values, e.g. `listen: 127.0.0.1:8080`",
            )]);
        }
    };
    let mut settings = Settings::default();
    let mut problems = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for (index, (key, value)) in map.iter().enumerate() {
        let locate_key = |mut p: Problem| {
            p.at = locate(text, index, Part::Key);
            p
        };
        let locate_value = |mut p: Problem| {
            p.at = locate(text, index, Part::Value);
            p
        };
        let Some(key) = scalar(key) else {
            problems.push(locate_key(Problem::new(None, "a key must be a flag name")));
            continue;
        };
        let arg = match find_arg(root, &key) {
            Ok(arg) => arg,
            Err(message) => {
                problems.push(locate_key(Problem::new(Some(&key), message)));
                continue;
            }
        };
        let long = arg.get_long().unwrap_or_default();
        if let Some((_, first)) = seen.iter().find(|(id, _)| id == arg.get_id().as_str()) {
            let message = format!("set twice (also as `{first}`)");
            problems.push(locate_key(Problem::new(Some(long), message)));
            continue;
        }
        seen.push((arg.get_id().to_string(), key.clone()));
        match render(arg, value) {
            Ok(args) => {
                let refused: Vec<String> = args.iter().filter_map(|a| check_value(arg, a).err()).collect();
                if refused.is_empty() {
                    settings.entries.push(Entry { id: arg.get_id().to_string(), args });
                } else {
                    problems.extend(refused.into_iter().map(|m| locate_value(Problem::new(Some(long), m))));
                }
            }
            Err(message) => problems.push(locate_value(Problem::new(Some(long), message))),
        }
    }
    if problems.is_empty() { Ok(settings) } else { Err(problems) }
}

/// Parses `argv` (a whole command line whose subcommand is `serve`), then again with the file's
/// settings appended for every argument that neither a flag nor an environment variable set.
/// The second parse checks what only the whole command line can show (an argument that needs
/// another); its matches are the effective settings.
pub fn layer(root: &Command, argv: &[OsString], settings: &Settings) -> Result<ArgMatches, Vec<Problem>> {
    let first = root.clone().try_get_matches_from(argv).map_err(|e| vec![clap_problem(&e)])?;
    let Some(serve) = first.subcommand_matches(SERVE) else {
        return Err(vec![Problem::new(None, "a configuration file sets the flags of `pixflow serve` only")]);
    };
    let mut full = argv.to_vec();
    for entry in &settings.entries {
        if matches!(serve.value_source(&entry.id), None | Some(ValueSource::DefaultValue)) {
            full.extend(entry.args.iter().map(OsString::from));
        }
    }
    root.clone().try_get_matches_from(full).map_err(|e| vec![clap_problem(&e)])
}

/// Checks a file and layers it under `argv` (see [`layer`]), then checks the effective settings
/// for contradictions: the effective matches of the whole command line, or every problem.
pub fn resolve(root: &Command, argv: &[OsString], text: &str) -> Result<ArgMatches, Vec<Problem>> {
    let settings = parse(text, root)?;
    let matches = layer(root, argv, &settings)?;
    let serve = matches.subcommand_matches(SERVE).expect("layer keeps the serve command");
    let args = <crate::serve::ServeArgs as clap::FromArgMatches>::from_arg_matches(serve)
        .map_err(|e| vec![clap_problem(&e)])?;
    let problems: Vec<Problem> = args
        .validate()
        .into_iter()
        .map(|c| {
            let prefix = format!("--{}: ", c.field);
            let message = c.message.strip_prefix(&prefix).unwrap_or(&c.message).to_owned();
            Problem { at: locate_field(text, root, c.field), field: Some(c.field.to_owned()), message }
        })
        .collect();
    if problems.is_empty() { Ok(matches) } else { Err(problems) }
}

/// Where a field's key sits in the file, for problems found after parsing (settings that
/// contradict each other).
fn locate_field(text: &str, root: &Command, field: &str) -> Option<(usize, usize)> {
    let Ok(Value::Mapping(map)) = yaml_serde::from_str::<Value>(text) else { return None };
    let index = map
        .keys()
        .position(|k| scalar(k).and_then(|k| find_arg(root, &k).ok()).is_some_and(|a| a.get_long() == Some(field)))?;
    locate(text, index, Part::Key)
}

/// The effective settings of `serve` as YAML: every flag by its long name, unset ones as null
/// (so the output is itself a valid configuration file), secrets as `"<redacted>"`.
pub fn effective_yaml(root: &Command, serve: &ArgMatches) -> String {
    let mut map = yaml_serde::Mapping::new();
    for arg in settable(serve_command(root)) {
        let long = arg.get_long().unwrap_or_default();
        let raw: Vec<String> = serve
            .get_raw(arg.get_id().as_str())
            .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = if raw.is_empty() {
            Value::Null
        } else if is_secret(arg) {
            Value::String(REDACTED.into())
        } else if is_flag(arg) {
            Value::Bool(raw.iter().any(|v| v == "true"))
        } else if matches!(arg.get_action(), ArgAction::Append) {
            Value::Sequence(raw.into_iter().map(typed).collect())
        } else {
            raw.into_iter().next().map_or(Value::Null, typed)
        };
        map.insert(Value::String(long.to_owned()), value);
    }
    yaml_serde::to_string(&map).unwrap_or_default()
}

/// A number that prints back as the same text is shown as a number, anything else as a string.
fn typed(raw: String) -> Value {
    match raw.parse::<u64>() {
        Ok(n) if n.to_string() == raw => Value::Number(n.into()),
        _ => Value::String(raw),
    }
}

fn serve_command(root: &Command) -> &Command {
    root.find_subcommand(SERVE).expect("the CLI has a serve command")
}

/// The arguments a file may set: `serve`'s long flags but `config`.
fn settable(serve: &Command) -> impl Iterator<Item = &Arg> {
    serve.get_arguments().filter(|a| a.get_long().is_some() && a.get_id() != CONFIG && !is_meta(a))
}

fn is_meta(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version)
}

fn is_flag(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

/// Tokens, keys and secrets, by name (`admin-token`, `cdn-signing-key`, `s3-secret-key`) or by
/// the flag hiding its environment value.
fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set() || secret_name(arg.get_long().unwrap_or_default())
}

fn secret_name(name: &str) -> bool {
    ["token", "secret", "key"].iter().any(|end| name.ends_with(end))
}

/// The `serve` argument a key names, or why it names none.
fn find_arg<'a>(root: &'a Command, key: &str) -> Result<&'a Arg, String> {
    let serve = serve_command(root);
    if let Some(arg) = settable(serve).find(|a| {
        let long = a.get_long().unwrap_or_default();
        key == long || key == long.replace('-', "_")
    }) {
        return Ok(arg);
    }
    let flag = key.replace('_', "-");
    if flag == CONFIG {
        return Err("`config` names the file itself and cannot be set in one".into());
    }
    let mut message = match other_command(root, &flag) {
        Some(owner) => format!("is an option of `pixflow {owner}`, not of `pixflow serve`"),
        None => "unknown key: not a flag of `pixflow serve`".to_owned(),
    };
    let closest = settable(serve)
        .filter_map(|a| a.get_long())
        .map(|long| (strsim::levenshtein(&flag.to_ascii_lowercase(), long), long))
        .min();
    if let Some((distance, long)) = closest
        && distance <= 2
    {
        message.push_str(&format!("; did you mean `{long}`?"));
    }
    Err(message)
}

/// The other subcommand (as `functions check`) that has a flag of this long name, if any.
fn other_command(root: &Command, flag: &str) -> Option<String> {
    fn walk(cmd: &Command, path: &str, flag: &str) -> Option<String> {
        if cmd.get_arguments().any(|a| a.get_long() == Some(flag) && !is_meta(a)) {
            return Some(path.to_owned());
        }
        cmd.get_subcommands().find_map(|sub| walk(sub, &format!("{path} {}", sub.get_name()), flag))
    }
    root.get_subcommands().filter(|sub| sub.get_name() != SERVE).find_map(|sub| walk(sub, sub.get_name(), flag))
}

/// The argument strings one value renders to.
fn render(arg: &Arg, value: &Value) -> Result<Vec<String>, String> {
    let long = arg.get_long().unwrap_or_default();
    if value.is_null() {
        // Null is "not set", as the printed settings show unset flags.
        return Ok(Vec::new());
    }
    if is_flag(arg) {
        return match value {
            Value::Bool(b) if *b == matches!(arg.get_action(), ArgAction::SetTrue) => Ok(vec![format!("--{long}")]),
            Value::Bool(_) => Ok(Vec::new()),
            other => Err(format!("expected true or false, found {}", kind(other))),
        };
    }
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    match value {
        Value::Sequence(items) if repeatable => items
            .iter()
            .map(|item| match scalar(item) {
                Some(s) => Ok(format!("--{long}={s}")),
                None => Err(format!("expected a list of values, found a list holding {}", kind(item))),
            })
            .collect(),
        Value::Sequence(_) => Err("expected one value, found a list (this flag is not repeatable)".into()),
        other => match scalar(other) {
            Some(s) => Ok(vec![format!("--{long}={s}")]),
            None if repeatable => Err(format!("expected a value or a list of values, found {}", kind(other))),
            None => Err(format!("expected a value, found {}", kind(other))),
        },
    }
}

/// A scalar as the text a flag would take.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "true or false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a map (configuration files are flat: one key per flag)",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Runs the value of one rendered `--long=value` through the argument's own value parser (and
/// delimiter), alone, so a refusal is the field's own. Flags (`--long`) have no value to check.
fn check_value(arg: &Arg, rendered: &str) -> Result<(), String> {
    let Some((_, value)) = rendered.split_once('=') else { return Ok(()) };
    let mut probe = Arg::new(arg.get_id().clone())
        .action(ArgAction::Append)
        .allow_hyphen_values(true)
        .value_parser(arg.get_value_parser().clone());
    if let Some(delimiter) = arg.get_value_delimiter() {
        probe = probe.value_delimiter(delimiter);
    }
    let cmd = Command::new(SERVE).no_binary_name(true).disable_help_flag(true).arg(probe);
    let Err(e) = cmd.try_get_matches_from([value]) else { return Ok(()) };
    if value.is_empty() {
        return Err("expected a value, found an empty string".into());
    }
    let valid = match e.get(clap::error::ContextKind::ValidValue) {
        Some(clap::error::ContextValue::Strings(values)) if !values.is_empty() => Some(values.join(", ")),
        _ => None,
    };
    if is_secret(arg) {
        return Err(match valid {
            Some(valid) => format!("refused (value not shown): expected one of {valid}"),
            None => "refused (value not shown)".into(),
        });
    }
    let reason = match (std::error::Error::source(&e), valid) {
        (Some(source), _) => source.to_string(),
        (None, Some(valid)) => format!("expected one of {valid}"),
        (None, None) => clap_first_line(&e),
    };
    // pixflow's own parsers quote the value already.
    Err(if reason.contains(&format!("`{value}`")) { reason } else { format!("`{value}`: {reason}") })
}

/// A problem from a whole-command-line parse: which argument, and clap's words.
fn clap_problem(e: &clap::Error) -> Problem {
    use clap::error::{ContextKind, ContextValue};
    let field = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => long_of(arg),
        Some(ContextValue::Strings(args)) => args.first().and_then(|a| long_of(a)),
        _ => None,
    };
    let message = match e.kind() {
        clap::error::ErrorKind::MissingRequiredArgument => "not set, but another setting needs it".to_owned(),
        // Values were checked one by one before; never echo one here (it may be a secret).
        clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation => {
            "the value a flag or environment variable gives is not valid".to_owned()
        }
        _ => clap_first_line(e),
    };
    Problem { at: None, field, message }
}

/// `--s3-secret-key <S3_SECRET_KEY>` -> `s3-secret-key`.
fn long_of(usage: &str) -> Option<String> {
    usage.strip_prefix("--").map(|rest| rest.split([' ', '=', '<']).next().unwrap_or(rest).to_owned())
}

fn clap_first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Key,
    Value,
}

/// Line and column of the `index`th entry's key or value in the top-level mapping. yaml_serde
/// keeps no positions in its `Value`, but it gives every error the position of the node being
/// read: a second pass fails on purpose at that node and reads the position off the error.
fn locate(text: &str, index: usize, part: Part) -> Option<(usize, usize)> {
    let de = yaml_serde::Deserializer::from_str(text);
    match serde::Deserializer::deserialize_map(de, Finder { index, part }) {
        Ok(()) => None,
        Err(e) => e.location().map(|l| (l.line(), l.column())),
    }
}

struct Finder {
    index: usize,
    part: Part,
}

impl<'de> serde::de::Visitor<'de> for Finder {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::IgnoredAny;
        for i in 0.. {
            if i == self.index && self.part == Part::Key {
                return map.next_key_seed(Here).map(drop);
            }
            if map.next_key::<IgnoredAny>()?.is_none() {
                break;
            }
            if i == self.index {
                return map.next_value_seed(Here);
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Fails on whatever node it is handed, so the error carries that node's position.
struct Here;

impl<'de> serde::de::DeserializeSeed<'de> for Here {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(Here)
    }
}

impl<'de> serde::de::Visitor<'de> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("nothing (this pass only finds positions)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_values() {
        let text = "listen: x\n# note\ndata-dir:   d\nurl-allow:\n  - a\n";
        assert_eq!(locate(text, 0, Part::Key), Some((1, 1)));
        assert_eq!(locate(text, 0, Part::Value), Some((1, 9)));
        assert_eq!(locate(text, 1, Part::Value), Some((3, 13)));
        assert_eq!(locate(text, 2, Part::Value), Some((5, 3)));
        assert_eq!(locate(text, 3, Part::Key), None);
        let json = "{\"listen\": \"x\",\n \"cpus\": 2}";
        assert_eq!(locate(json, 1, Part::Key), Some((2, 2)));
    }

    #[test]
    fn numbers_print_as_numbers_only_when_they_read_back_the_same() {
        assert_eq!(typed("1024".into()), Value::Number(1024.into()));
        assert_eq!(typed("007".into()), Value::String("007".into()));
        assert_eq!(typed("1Gi".into()), Value::String("1Gi".into()));
    }
}
