//! NetworkPolicies let exactly the roles that must talk talk.

use ril_tests::k8s::network_policy::{Pod, allowed};
use ril_tests::k8s::*;
use ril_tests::need_kubectl;

#[test]
fn network_policies_let_exactly_the_roles_that_must_talk_talk() {
    need_kubectl!();
    for r in all_renderings() {
        let pods: Vec<Pod> = r
            .workloads()
            .iter()
            .map(|w| Pod {
                role: subcommand(w.containers()[0]),
                labels: w.pod_labels(),
            })
            .collect();
        let port = |role: &str| serving_port(r.workload_running(role).containers()[0]).unwrap();
        let ring = port_of(
            &flag(
                &args(r.workload_running("learner").containers()[0]),
                "--collective-listen",
            )
            .unwrap(),
        );
        let is = |p: &Pod, role: &str| p.role == role;
        let ok = |from: &str, to: &str, port: u16| {
            let mut any = false;
            for a in pods.iter().filter(|p| is(p, from)) {
                for b in pods.iter().filter(|p| is(p, to)) {
                    any = true;
                    assert!(
                        allowed(&r, a, b, port),
                        "{}: {from} must reach {to} on {port}",
                        r.name
                    );
                }
            }
            assert!(any, "{}: no {from} or no {to}", r.name);
        };
        let denied = |from: &str, to: &str, port: u16| {
            for a in pods.iter().filter(|p| is(p, from)) {
                for b in pods.iter().filter(|p| is(p, to)) {
                    assert!(
                        !allowed(&r, a, b, port),
                        "{}: {from} may reach {to} on {port}, which it never needs",
                        r.name
                    );
                }
            }
        };
        let (coordinator, learner, discriminator, teacher, actor) = (
            port("coordinator"),
            port("learner"),
            port("discriminator serve"),
            serving_port(
                r.workloads()
                    .iter()
                    .find(|w| subcommand(w.containers()[0]) == "teacher")
                    .expect("a teacher")
                    .containers()[0],
            )
            .unwrap(),
            port("actor"),
        );
        ok("actor", "coordinator", coordinator);
        ok("actor", "learner", learner);
        ok("actor", "teacher", teacher);
        ok("actor", "discriminator serve", discriminator);
        ok("learner", "coordinator", coordinator);
        ok("learner", "discriminator serve", discriminator);
        ok("learner", "learner", learner);
        ok("learner", "learner", ring);
        ok("learner", "learner", 41_000); // NCCL picks its own ports
        for role in [
            "coordinator",
            "learner",
            "teacher",
            "discriminator serve",
            "actor",
        ] {
            denied(role, "actor", actor);
        }
        denied("teacher", "coordinator", coordinator);
        denied("teacher", "learner", learner);
        denied("teacher", "discriminator serve", discriminator);
        denied("coordinator", "learner", learner);
        denied("coordinator", "teacher", teacher);
        denied("coordinator", "discriminator serve", discriminator);
        denied("discriminator serve", "learner", learner);
        denied("discriminator serve", "coordinator", coordinator);
        denied("actor", "learner", ring);
        denied("actor", "coordinator", learner);
        denied("teacher", "teacher", teacher);
        // The plaintext health ports are for the kubelet, which NetworkPolicies do not cover.
        let health = health_port(r.workload_running("coordinator").containers()[0]).unwrap();
        denied("actor", "coordinator", health);
        denied("learner", "discriminator serve", health);
    }
}
