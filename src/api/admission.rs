//! The MutatingAdmissionPolicy that gives each new VirtualMachine the agent's finalizer
//! as it is created (the chart's templates/domain-finalizer.yaml; one CEL expression,
//! charts/vmlet/files/domain-finalizer.cel, serves both). For installs without Helm
//! (tests, benchmarks) as the chart writes it.

use serde_json::{Value, json};

/// The policy's JSONPatch expression.
pub const DOMAIN_FINALIZER_CEL: &str =
    include_str!("../../charts/vmlet/files/domain-finalizer.cel");

/// The policy and its binding, both named `name`; `namespaces` (a label selector)
/// narrows it to some namespaces, as tests do that must not change the others.
pub fn domain_finalizer_policy(name: &str, namespaces: Option<Value>) -> [Value; 2] {
    let mut constraints = json!({"resourceRules": [{
        "apiGroups": [super::GROUP],
        "apiVersions": ["*"],
        "operations": ["CREATE"],
        "resources": ["virtualmachines"],
    }]});
    if let Some(selector) = namespaces {
        constraints["namespaceSelector"] = selector;
    }
    [
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Ignore",
                "reinvocationPolicy": "Never",
                "matchConstraints": constraints,
                "mutations": [{
                    "patchType": "JSONPatch",
                    "jsonPatch": {"expression": DOMAIN_FINALIZER_CEL},
                }],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name},
        }),
    ]
}

/// Installs (server-side apply) or removes the policy and its binding named `name`.
pub async fn apply_domain_finalizer_policy(
    client: &kube::Client,
    name: &str,
    namespaces: Option<Value>,
    install: bool,
) -> Result<(), kube::Error> {
    use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
    for obj in domain_finalizer_policy(name, namespaces) {
        let kind = obj["kind"].as_str().unwrap_or_default();
        let plural = if kind.ends_with("Policy") {
            "mutatingadmissionpolicies"
        } else {
            "mutatingadmissionpolicybindings"
        };
        let ar = ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        if install {
            let pp = PatchParams::apply("vmlet-install").force();
            api.patch(name, &pp, &Patch::Apply(&obj)).await?;
        } else {
            match api.delete(name, &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_expression_names_the_agents_finalizer() {
        assert!(super::DOMAIN_FINALIZER_CEL.contains(super::super::DOMAIN_FINALIZER));
    }
}
