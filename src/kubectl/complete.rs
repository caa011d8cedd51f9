//! Shell completion through kubectl: kubectl (>= 1.26) completes `kubectl vm ...` by
//! running `kubectl_complete-vm` with the words typed so far (the last one partial) and
//! reads cobra's answer: one candidate per line, then `:DIRECTIVE`. VM and node names
//! come from the cluster, with the connection flags already typed.

use kube::api::{Api, ListParams};

use super::session::Flags;
use crate::api::{Hypervisor, VirtualMachine};

/// cobra's ShellCompDirectiveNoFileComp: offer no file names when nothing matches.
const NO_FILE_COMP: u32 = 4;

/// What the last word is.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    /// A subcommand name.
    Subcommand,
    /// A flag of this subcommand (or a global one).
    Flag(Option<String>),
    /// A VirtualMachine's name in the namespace the words name.
    VmName,
    /// A hypervisor's name.
    NodeName,
    /// A shell, for `completion`.
    Shell,
    Nothing,
}

/// The global flags that take a value, so that their value is not taken for a word.
const VALUE_FLAGS: [&str; 10] = [
    "-n",
    "--namespace",
    "--kubeconfig",
    "--context",
    "--cluster",
    "--user",
    "--token",
    "--as",
    "--as-group",
    "--request-timeout",
];

/// Pure: what to complete, and the connection flags typed before it.
pub fn decide(words: &[String]) -> (Want, Flags) {
    let (last, done) = match words.split_last() {
        Some((l, d)) => (l.as_str(), d),
        None => ("", &[][..]),
    };
    let mut flags = Flags::default();
    let mut sub: Option<&str> = None;
    let mut positional = 0;
    let mut after: Option<&str> = None;
    let mut i = 0;
    while i < done.len() {
        let w = done[i].as_str();
        let (name, inline) = match w.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n, Some(v.to_string())),
            _ => (w, None),
        };
        let takes_value = VALUE_FLAGS.contains(&name)
            || matches!(
                (sub, name),
                (Some("migrate"), "--to") | (Some("nodes"), "--wait")
            )
            || matches!(
                (sub, name),
                (Some("drain"), "--timeout") | (Some("console"), "--idle")
            )
            || matches!(
                (sub, name),
                (Some("vnc"), "--port") | (_, "-o" | "--output")
            );
        if name.starts_with('-') && takes_value {
            let value = inline.or_else(|| {
                i += 1;
                done.get(i).cloned()
            });
            after = if value.is_none() { Some(name) } else { None };
            match name {
                "-n" | "--namespace" => flags.namespace = value,
                "--kubeconfig" => flags.kubeconfig = value.map(Into::into),
                "--context" => flags.context = value,
                "--cluster" => flags.cluster = value,
                "--user" => flags.user = value,
                _ => {}
            }
        } else if !name.starts_with('-') {
            match sub {
                None => sub = Some(w),
                Some(_) => positional += 1,
            }
            after = None;
        }
        i += 1;
    }
    let want = if let Some(flag) = after {
        match flag {
            "--to" => Want::NodeName,
            _ => Want::Nothing,
        }
    } else if last.starts_with('-') {
        Want::Flag(sub.map(String::from))
    } else {
        match (sub, positional) {
            (None, _) => Want::Subcommand,
            (Some("start" | "stop" | "restart" | "console" | "vnc" | "migrate"), 0) => Want::VmName,
            (Some("drain"), 0) => Want::NodeName,
            (Some("completion"), 0) => Want::Shell,
            _ => Want::Nothing,
        }
    };
    (want, flags)
}

/// The answer kubectl prints: candidates that start with the last word, then the
/// directive line.
pub async fn answer(cli: &clap::Command, words: &[String]) -> String {
    let last = words.last().map(String::as_str).unwrap_or("");
    let (want, flags) = decide(words);
    let names = |c: &clap::Command| -> Vec<String> {
        c.get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect()
    };
    let candidates: Vec<String> = match want {
        Want::Subcommand => cli
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_string())
            .collect(),
        Want::Flag(sub) => {
            let mut all = names(cli);
            if let Some(c) = sub.and_then(|s| cli.find_subcommand(&s).cloned()) {
                all.extend(names(&c));
            }
            all
        }
        Want::Shell => ["bash", "zsh", "fish", "powershell", "elvish"]
            .map(String::from)
            .to_vec(),
        Want::VmName | Want::NodeName => from_cluster(&want, &flags).await,
        Want::Nothing => vec![],
    };
    let mut out = String::new();
    for c in candidates.iter().filter(|c| c.starts_with(last)) {
        out.push_str(c);
        out.push('\n');
    }
    out.push_str(&format!(":{NO_FILE_COMP}\n"));
    out
}

/// VM or node names; none when the cluster cannot be reached (completion stays quiet).
async fn from_cluster(want: &Want, flags: &Flags) -> Vec<String> {
    let Ok((client, namespace)) = super::session::connect(flags).await else {
        return vec![];
    };
    let mut names = match want {
        Want::VmName => names_of(Api::<VirtualMachine>::namespaced(client, &namespace)).await,
        _ => names_of(Api::<Hypervisor>::all(client)).await,
    };
    names.sort();
    names
}

/// The names of the objects `api` lists (metadata only); none on an error.
async fn names_of<K>(api: Api<K>) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list_metadata(&ListParams::default()).await {
        Ok(l) => l
            .items
            .into_iter()
            .filter_map(|m| m.metadata.name)
            .collect(),
        Err(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        let mut w: Vec<String> = s.split_whitespace().map(String::from).collect();
        if s.ends_with(' ') || s.is_empty() {
            w.push(String::new());
        }
        w
    }

    #[test]
    fn decides_what_the_last_word_is() {
        // (typed after `kubectl vm`, what is completed, namespace seen)
        let table: [(&str, Want, Option<&str>); 11] = [
            ("", Want::Subcommand, None),
            ("st", Want::Subcommand, None),
            ("start ", Want::VmName, None),
            ("-n prod start we", Want::VmName, Some("prod")),
            ("--namespace=prod console ", Want::VmName, Some("prod")),
            ("start web ", Want::Nothing, None),
            ("migrate web --to ", Want::NodeName, None),
            ("drain ", Want::NodeName, None),
            ("completion ", Want::Shell, None),
            ("start --", Want::Flag(Some("start".into())), None),
            ("--context kind start ", Want::VmName, None),
        ];
        for (typed, want, ns) in table {
            let (got, flags) = decide(&words(typed));
            assert_eq!(got, want, "{typed:?}");
            assert_eq!(flags.namespace.as_deref(), ns, "{typed:?}");
        }
    }
}
