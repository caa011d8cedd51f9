//! The two halves of "never two copies" across an API server outage, checked together
//! for every cluster size up to 40: whenever a silent group of agents skips fencing
//! (agent::peers::decide says Outage), the controller may not move VMs off silent nodes
//! (controller::nodeloss::may_move is false), whatever the other agents answered.

use vmlet::agent::peers::{Verdict, decide};
use vmlet::controller::nodeloss::may_move;

#[test]
fn no_cluster_size_lets_a_group_skip_fencing_while_its_vms_move() {
    for total in 1..=40usize {
        for silent in 1..=total {
            // The asking agent plus `silent - 1` peers that cannot reach the API server;
            // the rest did not answer (cut off from the asker).
            let mut answers = vec![Some(false); silent - 1];
            answers.extend(vec![None; total - silent]);
            if decide(total, &answers) == Verdict::Outage {
                // The controller sees at least this group silent.
                for lost in silent..=total {
                    assert!(
                        !may_move(lost, total),
                        "{silent} of {total} skipped fencing, yet {lost} lost may move"
                    );
                }
            }
        }
    }
}
