//! Helpers for `metav1.Condition` lists keyed by type.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// A condition that keeps the previous transition time when its status did not change,
/// so that rewriting the same observation is a no-op.
pub fn new(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = match find(previous, type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn keeps_transition_time_while_status_holds() {
        let first = new(&[], "Ready", true, "Running", "", Some(1), t(10));
        let second = new(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "Running",
            "",
            Some(2),
            t(20),
        );
        assert_eq!(second.last_transition_time, t(10));
        let third = new(&[second], "Ready", false, "Stopped", "", Some(2), t(30));
        assert_eq!(third.last_transition_time, t(30));
    }
}
