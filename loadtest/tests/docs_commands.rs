//! Every `jvpn-*` command the docs show (fenced blocks and inline code in
//! docs/*.md) is accepted by that program's command line as written:
//! flags, subcommands and values. Most of them are benchmarks and soaks
//! that take minutes to hours, so this checks what can go stale without
//! running them (a renamed flag, a removed subcommand, a value out of
//! range); the README's and deploy/README.md's commands are run in full by
//! `readme_commands`.

#![allow(clippy::unwrap_used)]

use std::path::Path;

/// One place the docs show code.
#[derive(Debug)]
struct Snippet {
    text: String,
    /// Inline code in prose: often a reference (`jvpn-agent connect
    /// --socks`), not a whole command.
    inline: bool,
}

/// Lines of fenced blocks (continuations joined) and inline code spans;
/// anything with an ellipsis is elided on purpose and left out.
fn snippets(md: &str) -> Vec<Snippet> {
    let mut out = Vec::new();
    let mut fenced = false;
    let mut pending = String::new();
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            let l = line.trim();
            if let Some(head) = l.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(l);
            let text = std::mem::take(&mut pending);
            out.push(Snippet {
                text,
                inline: false,
            });
        } else {
            out.extend(line.split('`').skip(1).step_by(2).map(|t| Snippet {
                text: t.to_owned(),
                inline: true,
            }));
        }
    }
    out.retain(|s| !s.text.contains('…'));
    out
}

/// Whether clap's refusal of `argv` is only that an inline reference
/// stops short (a subcommand or flag named without what it needs), never
/// a flag, subcommand or value that does not exist.
fn stops_short(e: &clap::Error, argv: &[String]) -> bool {
    use clap::error::ErrorKind::*;
    match e.kind() {
        MissingRequiredArgument | MissingSubcommand | DisplayHelpOnMissingArgumentOrSubcommand => {
            true
        }
        InvalidValue => argv.last().is_some_and(|w| w.starts_with("--")),
        _ => false,
    }
}

/// Shell words of one simple command (quotes removed; no expansions).
fn words(cmd: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in cmd.chars() {
        match (quote, c) {
            (None, '\'' | '"') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The program's command line, by name.
fn program(name: &str) -> Option<clap::Command> {
    Some(match name {
        "jvpn-gateway" => <jvpn_gateway::cli::Cli as clap::CommandFactory>::command(),
        "jvpn-router" => <jvpn_router::cli::Cli as clap::CommandFactory>::command(),
        "jvpn-agent" => jvpn_agent::cli::command(),
        "jvpn-loadtest" => <jvpn_loadtest::cli::Cli as clap::CommandFactory>::command(),
        _ => return None,
    })
}

/// The `jvpn-*` invocations in one snippet, as argument vectors.
fn invocations(snippet: &str) -> Vec<Vec<String>> {
    let code = match snippet.find(" #") {
        Some(i) => &snippet[..i],
        None => snippet,
    };
    let code = code.replace("cargo run --release -p jvpn-loadtest --", "jvpn-loadtest");
    let mut out = Vec::new();
    for part in code.split(['|', ';']).flat_map(|p| p.split("&&")) {
        let mut w = words(part.trim().trim_end_matches('&'));
        // Leading environment assignments (`KEY=value cmd ...`).
        while w
            .first()
            .is_some_and(|x| x.contains('=') && !x.starts_with('-'))
        {
            w.remove(0);
        }
        let Some(first) = w.first() else { continue };
        let name = first.rsplit('/').next().unwrap_or(first);
        if !name.starts_with("jvpn-") || program(name).is_none() || w.len() < 2 {
            continue;
        }
        w[0] = name.to_owned();
        out.push(w);
    }
    out
}

#[test]
fn every_command_in_the_docs_is_accepted_as_written() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut checked = 0;
    let mut wrong = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&docs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    for f in &files {
        let md = std::fs::read_to_string(f).unwrap();
        for s in snippets(&md) {
            for argv in invocations(&s.text) {
                checked += 1;
                let cmd = program(&argv[0]).unwrap();
                if let Err(e) = cmd.try_get_matches_from(&argv)
                    && !(s.inline && stops_short(&e, &argv))
                {
                    wrong.push(format!(
                        "{}: `{}`\n  {}",
                        f.file_name().unwrap().to_string_lossy(),
                        argv.join(" "),
                        e.render().to_string().lines().next().unwrap_or("")
                    ));
                }
            }
        }
    }
    // The docs show dozens; finding few means this test stopped looking.
    assert!(checked >= 40, "only {checked} commands found in docs/*.md");
    assert!(
        wrong.is_empty(),
        "{} of {checked} commands in docs/ are not accepted:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    eprintln!("{checked} commands in docs/*.md accepted");
}

#[test]
fn the_extraction_finds_what_a_reader_would_run() {
    let md = "text `jvpn-agent connect --server a` more\n```\n\
              KEY=1 target/release/jvpn-loadtest run \\\n    --sessions 2 # why\n\
              jvpn-router check --config r.toml && jvpn-router run --config r.toml &\n```\n";
    let found: Vec<_> = snippets(md)
        .iter()
        .flat_map(|s| invocations(&s.text))
        .collect();
    assert_eq!(
        found,
        vec![
            vec!["jvpn-agent", "connect", "--server", "a"],
            vec!["jvpn-loadtest", "run", "--sessions", "2"],
            vec!["jvpn-router", "check", "--config", "r.toml"],
            vec!["jvpn-router", "run", "--config", "r.toml"],
        ]
    );
    // A stale flag is caught, inline too; a reference that stops short
    // is not a stale one.
    let check = |line: &str| {
        let argv = words(line);
        let e = program(&argv[0]).unwrap().try_get_matches_from(&argv).err();
        e.map(|e| stops_short(&e, &argv))
    };
    assert_eq!(check("jvpn-loadtest run --no-such-flag"), Some(false));
    assert_eq!(check("jvpn-loadtest run --scenario no-such"), Some(false));
    assert_eq!(check("jvpn-loadtest bench-members --members"), Some(true));
    assert_eq!(check("jvpn-gateway pki init"), Some(true));
    assert_eq!(check("jvpn-loadtest run --sessions 3"), None);
}
