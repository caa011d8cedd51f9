//! Front-proxy authentication, as every aggregated API server does it: the Kubernetes
//! API server authenticates the user and calls us with its proxy client certificate
//! (issued by the request-header CA, with one of the allowed names) and the user in
//! headers. The cluster publishes the CA, names and header names in the ConfigMap
//! kube-system/extension-apiserver-authentication. Headers are believed only from a
//! connection whose client certificate passed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

/// The ConfigMap's name and namespace.
pub const CONFIG_MAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");

/// How to read the user from a proxied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// PEM of the CA that issues the proxy's client certificate.
    pub client_ca: String,
    /// Common names the proxy's certificate may carry; empty: any from that CA.
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
}

/// The user a request is made for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

fn list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key) {
        None => Ok(vec![]),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("{key}: {e}")),
    }
}

/// Pure: the configuration from the ConfigMap's data.
pub fn config(cm: &ConfigMap) -> Result<Config, String> {
    let data = cm.data.clone().unwrap_or_default();
    let client_ca = data
        .get("requestheader-client-ca-file")
        .cloned()
        .ok_or("the API server publishes no requestheader-client-ca-file: start it with --requestheader-client-ca-file (front-proxy)")?;
    let lower = |v: Vec<String>| v.into_iter().map(|h| h.to_ascii_lowercase()).collect();
    Ok(Config {
        client_ca,
        allowed_names: list(&data, "requestheader-allowed-names")?,
        username_headers: lower(list(&data, "requestheader-username-headers")?),
        group_headers: lower(list(&data, "requestheader-group-headers")?),
        extra_prefixes: lower(list(&data, "requestheader-extra-headers-prefix")?),
    })
}

/// Pure: the user of a request whose connection presented a certificate from the CA
/// with common name `cn`; None when the certificate or the headers do not say one.
pub fn user(config: &Config, cn: Option<&str>, headers: &http::HeaderMap) -> Option<User> {
    let cn = cn?;
    if !config.allowed_names.is_empty() && !config.allowed_names.iter().any(|n| n == cn) {
        return None;
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let name = config
        .username_headers
        .iter()
        .flat_map(|h| values(h))
        .find(|v| !v.is_empty())?;
    let groups = config
        .group_headers
        .iter()
        .flat_map(|h| values(h))
        .collect();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        let key = k.as_str();
        if let Some(p) = config
            .extra_prefixes
            .iter()
            .find(|p| key.starts_with(p.as_str()))
        {
            // Extra keys are percent-encoded in header names (RFC 3986), lower-cased.
            let name = url::form_urlencoded::parse(&key.as_bytes()[p.len()..])
                .map(|(k, _)| k.into_owned())
                .next()
                .unwrap_or_default();
            if let Ok(v) = v.to_str() {
                extra.entry(name).or_default().push(v.to_string());
            }
        }
    }
    Some(User {
        name,
        groups,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            client_ca: String::new(),
            allowed_names: vec!["front-proxy-client".into()],
            username_headers: vec!["x-remote-user".into()],
            group_headers: vec!["x-remote-group".into()],
            extra_prefixes: vec!["x-remote-extra-".into()],
        }
    }

    #[test]
    fn the_user_comes_from_headers_only_behind_the_proxys_certificate() {
        let mut h = http::HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "dev".parse().unwrap());
        h.append("x-remote-group", "system:authenticated".parse().unwrap());
        h.insert("x-remote-extra-scopes", "a".parse().unwrap());
        h.insert("x-remote-extra-acme.com%2fproject", "p".parse().unwrap());
        let alice = user(&cfg(), Some("front-proxy-client"), &h).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["dev", "system:authenticated"]);
        assert_eq!(alice.extra["scopes"], ["a"]);
        assert_eq!(alice.extra["acme.com/project"], ["p"]);
        // No certificate, a certificate with another name, no user header: nobody.
        assert_eq!(user(&cfg(), None, &h), None);
        assert_eq!(user(&cfg(), Some("mallory"), &h), None);
        assert_eq!(
            user(&cfg(), Some("front-proxy-client"), &http::HeaderMap::new()),
            None
        );
        // An empty list of names allows any certificate from the CA.
        let any = Config {
            allowed_names: vec![],
            ..cfg()
        };
        assert_eq!(user(&any, Some("whoever"), &h).unwrap().name, "alice");
    }

    #[test]
    fn the_config_map_says_how_to_read_users() {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"data": {
            "requestheader-client-ca-file": "PEM",
            "requestheader-allowed-names": "[\"front-proxy-client\"]",
            "requestheader-username-headers": "[\"X-Remote-User\"]",
            "requestheader-group-headers": "[\"X-Remote-Group\"]",
            "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]",
        }}))
        .unwrap();
        assert_eq!(
            config(&cm).unwrap(),
            Config {
                client_ca: "PEM".into(),
                ..cfg()
            }
        );
        let empty: ConfigMap = serde_json::from_value(serde_json::json!({"data": {}})).unwrap();
        assert!(config(&empty).unwrap_err().contains("front-proxy"));
    }
}
