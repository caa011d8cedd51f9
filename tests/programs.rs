//! Every program that src/, tests/, benches/ and hack/ run is in hack/programs.tsv, and
//! hack/deps.sh (which installs the table's Debian packages) has installed it: a fresh
//! machine gets everything the code runs. The check that once hid a missing qemu-img.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// program -> (source, package)
fn table() -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(root().join("hack/programs.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 2, "hack/programs.tsv: bad line {l:?}");
            let pkg = f.get(2).copied().unwrap_or("").to_string();
            (f[0].to_string(), (f[1].to_string(), pkg))
        })
        .collect()
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root().join(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Programs Rust code starts: `Command::new("x")` (not clap's) and the agent's
/// `Tool { program: "x" }`, outside `#[cfg(test)]` modules' made-up names.
fn rust_programs(text: &str) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let re =
        regex_lite::Regex::new(r#"(clap::)?(?:Command::new\(\s*|program:\s*)"([A-Za-z0-9_.+-]+)""#)
            .unwrap();
    re.captures_iter(text)
        .filter(|c| c.get(1).is_none())
        .map(|c| c[2].to_string())
        .collect()
}

/// The script as the shell parses it for commands: heredoc bodies, comments and quoted
/// text removed, except command substitutions inside double quotes, which run.
fn shell_code(text: &str) -> String {
    let heredoc = regex_lite::Regex::new(r#"<<-?\s*['"]?([A-Za-z_]+)['"]?"#).unwrap();
    let mut lines = Vec::new();
    let mut end: Option<String> = None;
    for line in text.lines() {
        if let Some(e) = &end {
            if line.trim() == e {
                end = None;
            }
            continue;
        }
        if let Some(c) = heredoc.captures(line) {
            end = Some(c[1].to_string());
        }
        lines.push(line);
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Code,
        Single,
        Double,
        Comment,
    }
    // Modes nest: `"$(` opens code inside a double-quoted string, `)` closes it.
    let mut stack = vec![Mode::Code];
    let mut depth: Vec<u32> = vec![0];
    let mut out = String::new();
    let chars: Vec<char> = lines.join("\n").chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let mode = *stack.last().unwrap();
        match mode {
            Mode::Comment => {
                if c == '\n' {
                    stack.pop();
                    out.push('\n');
                }
            }
            Mode::Single => {
                if c == '\'' {
                    stack.pop();
                }
            }
            Mode::Double => match c {
                '\\' => i += 1,
                '"' => {
                    stack.pop();
                }
                '$' if next == Some('(') => {
                    stack.push(Mode::Code);
                    depth.push(0);
                    out.push_str("; ");
                    i += 1;
                }
                _ => {}
            },
            Mode::Code => match c {
                '\\' => {
                    out.push(' ');
                    i += 1;
                }
                '\'' => stack.push(Mode::Single),
                '"' => {
                    out.push_str(" \"\" ");
                    stack.push(Mode::Double);
                }
                // Arithmetic `((...))` and array values `=(...)` are no commands.
                '(' if next == Some('(') || out.ends_with('=') => {
                    let close = if next == Some('(') { "))" } else { ")" };
                    let rest: String = chars[i..].iter().collect();
                    i += rest.find(close).map_or(rest.len(), |p| p + close.len()) - 1;
                    out.push_str(" _ ");
                }
                '#' if out.ends_with(|p: char| p.is_whitespace() || p == ';') || out.is_empty() => {
                    stack.push(Mode::Comment)
                }
                '(' => {
                    *depth.last_mut().unwrap() += 1;
                    out.push(c);
                }
                ')' => {
                    let d = depth.last_mut().unwrap();
                    if *d == 0 && stack.len() > 1 {
                        stack.pop();
                        depth.pop();
                        out.push_str(" ;");
                    } else {
                        *d = d.saturating_sub(1);
                        out.push(c);
                    }
                }
                _ => out.push(c),
            },
        }
        i += 1;
    }
    out
}

const SHELL_WORDS: &[&str] = &[
    // keywords and builtins of bash
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "in",
    "function", "time", "echo", "printf", "read", "cd", "exit", "return", "local", "export", "set",
    "shift", "trap", "wait", "source", "true", "false", "test", "[", "[[", "mapfile", "declare",
    "unset", "eval", "exec", "type", "command", "let", "pwd", "break", "continue", "readonly",
    "getopts", "umask", "ulimit", "builtin", "kill",
];

/// Programs a shell script runs: the first word of each command, after assignments and
/// prefixes such as `exec`, `command` and `$SUDO`.
fn shell_programs(text: &str) -> BTreeSet<String> {
    let functions: BTreeSet<String> =
        regex_lite::Regex::new(r"(?m)^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*\(\)\s*\{")
            .unwrap()
            .captures_iter(text)
            .map(|c| c[1].to_string())
            .collect();
    let split =
        regex_lite::Regex::new(r"\|\||&&|[|;`({}\n]|\$\(|\bthen\b|\bdo\b|\belse\b|!").unwrap();
    let word = regex_lite::Regex::new(r"^[a-z][a-z0-9._+-]*$").unwrap();
    let mut out = BTreeSet::new();
    for segment in split.split(&shell_code(text)) {
        let mut words = segment.split_whitespace().skip_while(|w| {
            w.contains('=') && !w.starts_with('-')
                || matches!(*w, "exec" | "command" | "$SUDO" | "sudo" | "time")
        });
        let Some(first) = words.next() else { continue };
        if segment.trim_start().starts_with("for ") || first.ends_with(')') {
            continue;
        }
        if word.is_match(first) && !SHELL_WORDS.contains(&first) && !functions.contains(first) {
            out.insert(first.to_string());
        }
    }
    out
}

#[test]
fn every_program_the_project_runs_is_in_the_table() {
    let table = table();
    let mut missing = Vec::new();
    for dir in ["src", "tests", "benches"] {
        for f in files(dir, "rs") {
            if f.ends_with("tests/programs.rs") {
                continue; // its own examples
            }
            for p in rust_programs(&std::fs::read_to_string(&f).unwrap()) {
                if !table.contains_key(&p) {
                    missing.push(format!("{}: {p}", f.display()));
                }
            }
        }
    }
    let mut scripts = files("hack", "sh");
    scripts.push(root().join(".ci/run"));
    for f in scripts {
        for p in shell_programs(&std::fs::read_to_string(&f).unwrap()) {
            if !table.contains_key(&p) {
                missing.push(format!("{}: {p}", f.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "programs run but not in hack/programs.tsv (so hack/deps.sh may not install them):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_extractors_see_what_runs() {
    let rs = r#"Command::new("qemu-img").arg(x); std::process::Command::new(
        "virsh"); const T: Tool = Tool { program: "isoinfo", package: "genisoimage" };"#;
    assert_eq!(
        rust_programs(rs).into_iter().collect::<Vec<_>>(),
        ["isoinfo", "qemu-img", "virsh"]
    );
    let sh = "f() {\n  X=1 qemu-img create a && exec libvirtd -d\n}\nfor n in 1 2; do ip link; done\n\
              cat > f <<'EOF'\nnotaprogram here\nEOF\nv=$(genisoimage -o x) # busybox\nf\n$SUDO apt-get update\n\
              echo \"see (the log) $(virsh list) done\" | awk '{print $1}'\n";
    assert_eq!(
        shell_programs(sh).into_iter().collect::<Vec<_>>(),
        [
            "apt-get",
            "awk",
            "cat",
            "genisoimage",
            "ip",
            "libvirtd",
            "qemu-img",
            "virsh"
        ]
    );
}

/// Where `program` is on PATH (the way a shell would find it), following symlinks.
fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The table's Debian packages are installed (hack/deps.sh ran) and really ship the
/// program named beside them.
#[test]
fn every_debian_program_is_installed_from_its_package() {
    let mut wrong = Vec::new();
    // program -> (package, the paths dpkg may know its file by)
    let mut wanted: Vec<(String, String, Vec<String>)> = Vec::new();
    for (program, (source, package)) in table() {
        if source != "deb" {
            continue;
        }
        let Some(path) = which(&program) else {
            wrong.push(format!(
                "{program}: not on PATH (package {package}; run hack/deps.sh)"
            ));
            continue;
        };
        // With merged /usr dpkg may know the file under /bin or /sbin; an alternatives
        // symlink (awk -> mawk) belongs to the package of its target.
        let mut paths = vec![path.display().to_string()];
        if let Ok(real) = std::fs::canonicalize(&path) {
            paths.push(real.display().to_string());
        }
        for p in paths.clone() {
            for (a, b) in [("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/")] {
                if let Some(rest) = p.strip_prefix(a) {
                    paths.push(format!("{b}{rest}"));
                } else if let Some(rest) = p.strip_prefix(b) {
                    paths.push(format!("{a}{rest}"));
                }
            }
        }
        wanted.push((program, package, paths));
    }
    // One dpkg call for every path; it prints "pkg[, pkg]: path" for each it knows.
    let all: BTreeSet<&String> = wanted.iter().flat_map(|w| &w.2).collect();
    let out = std::process::Command::new("dpkg")
        .arg("-S")
        .args(all)
        .output()
        .expect("dpkg");
    let owners: BTreeMap<String, Vec<String>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (pkgs, path) = l.split_once(": ")?;
            let pkgs = pkgs
                .split(',')
                .map(|p| p.trim().split(':').next().unwrap_or("").to_string())
                .collect();
            Some((path.to_string(), pkgs))
        })
        .collect();
    for (program, package, paths) in wanted {
        let found: Vec<&String> = paths
            .iter()
            .filter_map(|p| owners.get(p))
            .flatten()
            .collect();
        if !found.iter().any(|p| **p == package) {
            wrong.push(format!(
                "{program}: {} is not from package {package} (dpkg -S says {found:?})",
                paths[0]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
