//! Configuration helpers shared by every service binary: a TOML file with
//! `PREFIX__SECTION__KEY` environment overrides, problems that name the key
//! they are about, and the checks that keep `docs/configuration.md` complete.
//!
//! Each binary owns its typed configuration and its validation; these
//! helpers only read, parse and report.

use std::path::Path;

use jvpn_proto::keys::ClusterSecret;

use crate::admin::AdminToken;

/// One problem with one key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
}

impl ConfigProblem {
    pub fn new(key: impl Into<String>, problem: impl ToString) -> Self {
        Self {
            key: key.into(),
            problem: problem.to_string(),
        }
    }

    /// A parser's error with the values it quotes left out (see
    /// `without_values`).
    fn scrubbed(key: impl Into<String>, error: &dyn std::fmt::Display) -> Self {
        Self::new(key, without_values(&error.to_string()))
    }
}

/// Every problem found; `Display` prints one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

/// Reads a required PEM file; a problem names `key`.
pub fn read_pem(key: &str, path: Option<&Path>, errs: &mut Vec<ConfigProblem>) -> Option<Vec<u8>> {
    let Some(path) = path else {
        errs.push(ConfigProblem::new(key, "required"));
        return None;
    };
    match std::fs::read(path) {
        Ok(b) if b.starts_with(b"-----BEGIN") => Some(b),
        Ok(_) => {
            errs.push(ConfigProblem::new(
                key,
                format!("{}: not a PEM file", path.display()),
            ));
            None
        }
        Err(e) => {
            errs.push(ConfigProblem::new(key, format!("{}: {e}", path.display())));
            None
        }
    }
}

/// Reads `admin_token_file` if set; a problem is filed under that key.
pub fn load_admin_token(path: Option<&Path>, errs: &mut Vec<ConfigProblem>) -> Option<AdminToken> {
    match AdminToken::load(path?) {
        Ok(t) => Some(t),
        Err(why) => {
            errs.push(ConfigProblem::new("admin_token_file", why));
            None
        }
    }
}

/// TOML file, then `PREFIX__SECTION__KEY` environment overrides (list keys
/// split on commas), deserialized into `T`. Shared by every binary.
pub fn parse_layered<T: serde::de::DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    prefix: &str,
    list_keys: &[&str],
) -> Result<T, ConfigErrors> {
    if !path.exists() {
        return Err(ConfigErrors(vec![ConfigProblem::new(
            "--config",
            format!("{} does not exist", path.display()),
        )]));
    }
    if let Ok(text) = std::fs::read_to_string(path) {
        strict_types::<T>(&text).map_err(ConfigErrors)?;
    }
    // Each override as the text it is: the key's type decides how it is
    // read (`node_id = 007` stays "007"; the crate's own environment
    // source guessed types first and made it 7).
    let head = format!("{prefix}__");
    let mut builder = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml));
    for (k, v) in env {
        let Some(rest) = k.strip_prefix(&head) else {
            continue;
        };
        let key = rest.to_lowercase().replace("__", ".");
        // Errors then say "in the environment", not which file.
        let origin = format!("the environment ({k})");
        let text = |t: &str| config::Value::new(Some(&origin), t);
        let set = if list_keys.contains(&key.as_str()) {
            let items: Vec<&str> = v.split(',').map(str::trim).collect();
            // An empty item is a typo or an unset template variable; an
            // empty list would silently drop the file's value (for
            // `cluster.routers`, the cluster itself).
            if items.iter().any(|i| i.is_empty()) {
                return Err(ConfigErrors(vec![ConfigProblem::new(
                    key,
                    format!("{k} has an empty list item"),
                )]));
            }
            let list: Vec<config::Value> = items.into_iter().map(text).collect();
            builder.set_override(key.as_str(), config::Value::new(Some(&origin), list))
        } else {
            builder.set_override(key.as_str(), text(&v))
        };
        builder = set.map_err(|e| ConfigErrors(vec![ConfigProblem::scrubbed(key.clone(), &e)]))?;
    }
    builder
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| ConfigErrors(vec![ConfigProblem::scrubbed(key_of(&e), &e)]))
}

/// Parses TOML text (no environment) into `T` the same way files are read:
/// what the configuration fuzz target feeds.
pub fn parse_toml_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigProblem> {
    if let Err(mut problems) = strict_types::<T>(text) {
        return Err(problems.swap_remove(0));
    }
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| ConfigProblem::scrubbed(key_of(&e), &e))
}

/// A parse error without the values it quotes: a problem is logged at
/// error level, and the value may be a secret (a dev token written where
/// a list belongs). serde's "invalid type: string \"…\", expected a
/// sequence" keeps the type ("string"); a TOML syntax error keeps its
/// position and message, not the quoted line.
fn without_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for line in msg.lines() {
        let t = line.trim_start();
        // The quoted source: "12 | dev_tokens = ..." and the caret line.
        let quoted = t.starts_with('|')
            || t.split_once('|').is_some_and(|(n, _)| {
                !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())
            });
        if quoted {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&without_unexpected(line));
    }
    out
}

/// "invalid type: integer `42`, expected …" → "invalid type: integer, expected …".
fn without_unexpected(line: &str) -> String {
    let mut rest = line;
    let mut out = String::with_capacity(line.len());
    while let Some(at) = ["invalid type: ", "invalid value: ", "invalid length "]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
        .min()
    {
        let (i, len) = at;
        out.push_str(&rest[..i + len]);
        rest = &rest[i + len..];
        // The last one: a quoted value may hold the words too.
        let end = rest.rfind(", expected").unwrap_or(rest.len());
        let kind = rest[..end]
            .split(['"', '`'])
            .next()
            .unwrap_or_default()
            .trim_end();
        out.push_str(kind);
        rest = &rest[end..];
    }
    out.push_str(rest);
    // "enum X does not have variant constructor <value>"
    if let Some(i) = out.find("variant constructor ") {
        out.truncate(i + "variant constructor".len());
    }
    out
}

/// The file alone, read as TOML into `T` with no coercion: the `config`
/// crate turns `node_id = 7` into `"7"` and `weight = 1.0` into `1`, which
/// hides typos of type. Every problem is filed under the key's full path
/// (`policy.heartbeat_interval_ms`). A missing key is not judged here: the
/// environment may supply it, and the layered parse reports it. Each
/// top-level key is checked on its own, so a section that lacks a key
/// (serde stops at the end of that section) hides nothing elsewhere.
fn strict_types<T: serde::de::DeserializeOwned>(text: &str) -> Result<(), Vec<ConfigProblem>> {
    // Syntax errors are reported by the layered parse, with its context.
    let Ok(table) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for (k, v) in table {
        let mut one = toml::Table::new();
        one.insert(k, v);
        if let Err(e) = serde_path_to_error::deserialize::<_, T>(toml::Value::Table(one)) {
            let msg = e.inner().to_string();
            if msg.starts_with("missing field") {
                continue;
            }
            let mut key = e.path().to_string();
            // An unknown key's error is raised on its parent: name the key.
            if let Some(rest) = msg.strip_prefix("unknown field `") {
                let field = rest.split('`').next().unwrap_or_default();
                if !key.ends_with(field) {
                    key = if key == "." || key.is_empty() {
                        field.to_owned()
                    } else {
                        format!("{key}.{field}")
                    };
                }
            }
            if key == "." || key.is_empty() {
                key = "config".to_owned();
            }
            problems.push(ConfigProblem::scrubbed(key, &msg));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Reads a `<key_id>:<hex>` cluster secret file; a problem is filed under `key`.
pub fn read_secret(key: &str, path: &Path, errs: &mut Vec<ConfigProblem>) -> Option<ClusterSecret> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<ClusterSecret>()
            .map_err(|e| errs.push(ConfigProblem::new(key, e)))
            .ok(),
        Err(e) => {
            errs.push(ConfigProblem::new(key, format!("{}: {e}", path.display())));
            None
        }
    }
}

/// `cluster.secret_file` and, when set, `cluster.previous_secret_file` (the
/// secret before the last rotation), which must name another key id.
pub fn read_secrets(
    current: &Path,
    previous: Option<&Path>,
    errs: &mut Vec<ConfigProblem>,
) -> (Option<ClusterSecret>, Option<ClusterSecret>) {
    let secret = read_secret("cluster.secret_file", current, errs);
    let previous = previous.and_then(|p| read_secret("cluster.previous_secret_file", p, errs));
    if let (Some(cur), Some(prev)) = (&secret, &previous)
        && cur.key_id() == prev.key_id()
    {
        errs.push(ConfigProblem::new(
            "cluster.previous_secret_file",
            "has the same key id as cluster.secret_file",
        ));
    }
    (secret, previous)
}

/// Files a problem for every zero value among `(key, value)`.
pub fn require_nonzero(errs: &mut Vec<ConfigProblem>, items: &[(&str, u64)]) {
    for (key, v) in items {
        if *v == 0 {
            errs.push(ConfigProblem::new(*key, "must be greater than zero"));
        }
    }
}

/// Keys set in an example TOML file that `docs` does not mention as
/// `` `key` `` (the test that keeps docs/configuration.md complete).
pub fn undocumented_keys(example_toml: &str, docs: &str) -> (usize, Vec<String>) {
    let mut seen = 0;
    let mut missing = Vec::new();
    for line in example_toml.lines().map(str::trim) {
        let line = line.trim_start_matches('#').trim();
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if key.is_empty() || key.contains(' ') {
                continue;
            }
            seen += 1;
            if !docs.contains(&format!("`{key}`")) {
                missing.push(key.to_owned());
            }
        }
    }
    (seen, missing)
}

/// Every key a configuration type has, as `section.key` (from its
/// serialized form, so a new field shows up without anyone listing it):
/// what docs/configuration.md must describe.
pub fn all_keys<T: serde::Serialize>(cfg: &T) -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = v {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_object() {
                    walk(&path, v, out);
                } else {
                    out.push(path);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::to_value(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// The keys of `all` whose last component is not named (in backticks) in `docs`.
pub fn undocumented<'a>(all: &'a [String], docs: &str) -> Vec<&'a str> {
    all.iter()
        .map(String::as_str)
        .filter(|k| {
            let leaf = k.rsplit('.').next().unwrap_or(k);
            !docs.contains(&format!("`{leaf}`"))
        })
        .collect()
}

/// Best effort: the key a `config` error is about.
fn key_of(e: &config::ConfigError) -> String {
    // A syntax error quotes the file's text: nothing in it names a key
    // (an input holding "missing field ``" gave an empty one).
    if matches!(e, config::ConfigError::FileParse { .. }) {
        return "config".to_owned();
    }
    let text = e.to_string();
    if let Some(rest) = text.split("for key `").nth(1) {
        return rest.split('`').next().unwrap_or("config").to_owned();
    }
    if let Some(rest) = text.split("unknown field `").nth(1) {
        return rest.split('`').next().unwrap_or("config").to_owned();
    }
    if let Some(rest) = text.split("missing field `").nth(1) {
        return rest.split('`').next().unwrap_or("config").to_owned();
    }
    "config".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Small {
        name: Option<String>,
    }

    /// Found by the config fuzz target: a syntax error quotes the input, and
    /// an input holding "missing field ``" made the problem's key empty.
    #[test]
    fn a_syntax_error_quoting_a_field_name_still_names_a_key() {
        let Err(p) = parse_toml_str::<Small>("[admissing field ``\0e") else {
            panic!("not TOML");
        };
        assert!(!p.key.is_empty(), "a problem without a key: {p}");
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Tokens {
        auth: Auth,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Auth {
        dev_tokens: Vec<String>,
        #[serde(default)]
        weight: u8,
    }

    #[derive(serde::Deserialize, Debug)]
    struct Named {
        node_id: String,
        weight: u32,
        on: bool,
        list: Vec<String>,
    }

    /// An override is read as the key's type wants it: a string stays the
    /// text given ("007" was made 7, "1.10" was made "1.1"), numbers and
    /// booleans parse, and a list key splits on commas.
    #[test]
    fn environment_overrides_keep_strings_exact() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "node_id = \"g1\"\nweight = 1\non = false\nlist = []\n",
        )
        .unwrap();
        let env = [
            ("T__NODE_ID", "007"),
            ("T__WEIGHT", "3"),
            ("T__ON", "true"),
            ("T__LIST", "a, b,c"),
            ("OTHER__WEIGHT", "9"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let n: Named = parse_layered(&file, env, "T", &["list"]).unwrap();
        assert_eq!(n.node_id, "007");
        assert_eq!((n.weight, n.on), (3, true));
        assert_eq!(n.list, ["a", "b", "c"]);
        // An empty list item (an unset template variable) is refused.
        for v in ["", "a,,b"] {
            let env = [("T__LIST".to_owned(), v.to_owned())];
            let e = parse_layered::<Named>(&file, env, "T", &["list"]).unwrap_err();
            assert_eq!(e.0[0].key, "list", "{e}");
        }
        let env = [("T__WEIGHT".to_owned(), "1.5".to_owned())];
        let e = parse_layered::<Named>(&file, env, "T", &["list"]).unwrap_err();
        assert_eq!(e.0[0].key, "weight", "{e}");
    }

    /// A problem is logged at error level: a token written where a list
    /// belongs (in the file, in the environment, or on a line with a
    /// syntax error) must not reach the log; the key and the kind do.
    #[test]
    fn a_problem_names_the_key_but_not_the_value() {
        const SECRET: &str = "tok0123456789abcdef";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let cases: [(String, Vec<(String, String)>); 4] = [
            (format!("[auth]\ndev_tokens = \"{SECRET}\"\n"), vec![]),
            (format!("[auth]\ndev_tokens = [\"{SECRET}\"\n"), vec![]),
            (
                "[auth]\ndev_tokens = []\n".into(),
                vec![("T__AUTH__WEIGHT".into(), format!("9{SECRET}"))],
            ),
            (
                "[auth]\ndev_tokens = []\n".into(),
                vec![("T__AUTH__DEV_TOKENS".into(), "12345678901234567".into())],
            ),
        ];
        for (text, env) in cases {
            std::fs::write(&file, &text).unwrap();
            let e = parse_layered::<Tokens>(&file, env.clone(), "T", &[]).expect_err("a bad value");
            let shown = e.to_string();
            for secret in [SECRET, "12345678901234567"] {
                assert!(!shown.contains(secret), "{env:?}: {shown}");
            }
            assert!(!shown.trim().is_empty(), "{env:?}");
        }
        std::fs::write(&file, format!("[auth]\ndev_tokens = \"{SECRET}\"\n")).unwrap();
        let e = parse_layered::<Tokens>(&file, Vec::new(), "T", &[]).unwrap_err();
        assert_eq!(e.0[0].key, "auth.dev_tokens");
        assert!(
            e.0[0].problem.starts_with("invalid type: string, expected"),
            "{e}"
        );
    }
}
