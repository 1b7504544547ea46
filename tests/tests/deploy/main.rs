//! The Kubernetes deployment (`deploy/k8s`) as a cluster would run it. Every kustomization is
//! rendered with `kubectl kustomize` (offline) and its objects checked for what a cluster needs
//! and `kubectl apply` does not check: gRPC probes on the ports the roles really serve,
//! resources, the run config that `ril config check` accepts, addresses that match the
//! Services, NetworkPolicies that let exactly the talking roles talk, no secrets in ConfigMaps.
//! Then real roles are started with the manifests' own command lines and probed the way the
//! kubelet probes them. Strict schema validation (`kubernetes-validate --strict`) runs in
//! `deploy/check.sh`, which CI runs.
//!
//! The tests need `kubectl` (the machine image has it); without it they fail saying so.
//!
//! The Kubernetes object model and the rendering live in `ril_tests::k8s`; the tests are grouped
//! by concern below.

mod binary;
mod kubelet;
mod manifests;
mod network;
mod roles;
mod secrets;
