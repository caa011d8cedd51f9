//! Label selectors (matchLabels and matchExpressions) as Kubernetes evaluates them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `sel`. An empty selector matches everything; an unknown
/// operator matches nothing (the API server refuses those anyway).
pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_exprs
}

/// A label selector written as `kubectl -l` takes it: requirements separated by commas,
/// each `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` or `!k`. An empty
/// string is refused: a Service's annotation that selects every VM is a mistake.
pub fn parse(text: &str) -> Result<LabelSelector, String> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement as Req;
    let req = |key: &str, op: &str, values: Option<Vec<String>>| -> Result<Req, String> {
        let key = key.trim();
        let valid = |s: &str, key: bool| {
            !s.is_empty()
                && s.len() <= if key { 317 } else { 63 }
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || (key && c == '/'))
        };
        if !valid(key, true) {
            return Err(format!("{key:?} is not a label key"));
        }
        if let Some(v) = values
            .iter()
            .flatten()
            .find(|v| !v.is_empty() && !valid(v, false))
        {
            return Err(format!("{v:?} is not a label value"));
        }
        Ok(Req {
            key: key.to_string(),
            operator: op.to_string(),
            values,
        })
    };
    let mut out = Vec::new();
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("the selector is empty".into());
    }
    while !rest.is_empty() {
        // A set's values hold commas: the requirement ends after its closing parenthesis.
        let end = match (rest.find('('), rest.find(',')) {
            (Some(open), Some(comma)) if open < comma => {
                rest.find(')').map(|c| c + 1).ok_or("an unclosed '('")?
            }
            (_, Some(comma)) => comma,
            (_, None) => rest.len(),
        };
        let (one, tail) = rest.split_at(end);
        rest = tail.trim_start_matches(',').trim_start();
        let one = one.trim();
        let set = |kw: &str| -> Option<(String, Vec<String>)> {
            let (k, vals) = one.split_once(&format!(" {kw} "))?;
            let vals = vals.trim().strip_prefix('(')?.strip_suffix(')')?;
            Some((
                k.to_string(),
                vals.split(',').map(|v| v.trim().to_string()).collect(),
            ))
        };
        out.push(if let Some((k, v)) = set("notin") {
            req(&k, "NotIn", Some(v))?
        } else if let Some((k, v)) = set("in") {
            req(&k, "In", Some(v))?
        } else if let Some((k, v)) = one.split_once("!=") {
            req(k, "NotIn", Some(vec![v.trim().to_string()]))?
        } else if let Some((k, v)) = one.split_once("==").or_else(|| one.split_once('=')) {
            req(k, "In", Some(vec![v.trim().to_string()]))?
        } else if let Some(k) = one.strip_prefix('!') {
            req(k, "DoesNotExist", None)?
        } else {
            req(one, "Exists", None)?
        });
    }
    Ok(LabelSelector {
        match_expressions: Some(out),
        match_labels: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn operators() {
        let l = labels(&[("app", "db"), ("tier", "a")]);
        let sel = |e| LabelSelector {
            match_expressions: Some(vec![e]),
            ..Default::default()
        };
        assert!(matches(&sel(expr("app", "In", &["db", "web"])), &l));
        assert!(!matches(&sel(expr("app", "NotIn", &["db"])), &l));
        assert!(matches(&sel(expr("zone", "NotIn", &["a"])), &l));
        assert!(matches(&sel(expr("tier", "Exists", &[])), &l));
        assert!(!matches(&sel(expr("tier", "DoesNotExist", &[])), &l));
        assert!(matches(&LabelSelector::default(), &l));
        let ml = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            ..Default::default()
        };
        assert!(!matches(&ml, &l));
    }

    #[test]
    fn selectors_parse_as_kubectl_writes_them() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("vmlet.dev/x", "1")]);
        for (text, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("app=web,tier=front", true),
            ("app=web, tier=back", false),
            ("app in (web,db)", true),
            ("app in (db, api),tier=front", false),
            ("app notin (db),tier", true),
            ("tier in (front),app=web", true),
            ("!zone", true),
            ("!app", false),
            ("zone", false),
            ("vmlet.dev/x=1", true),
            ("app=", false),
        ] {
            let sel = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(matches(&sel, &l), want, "{text}");
        }
        for bad in ["", "  ", "app in (web", "a b=c", "app=we b", "=web"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
