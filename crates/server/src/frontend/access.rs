//! Authorization by table: for every RPC, the role it needs, where its namespace is, and
//! whether it acts as a worker identity the caller must be allowed to use. The frontend applies
//! the table once per call ([`Frontend::admit`](super::Frontend)), before any handler code runs;
//! checks that depend on what a request asks for beyond its own namespace (signalling another
//! namespace, taking the next tasks from another) stay with their handlers.

use crate::auth::Role;
use tether_wire::pb;

/// Where a call's namespace is.
pub(super) enum Scope<'a> {
    /// The request's `namespace` field.
    Namespace(&'a str),
    /// The namespaces named inside the task tokens it carries (one per distinct namespace).
    Tokens(Vec<String>),
    /// No namespace: any grant at all will do.
    AnyGrant,
}

/// A request the table has a rule for.
pub(super) trait Guarded {
    /// The role the call needs in its namespace.
    const ROLE: Role;
    /// Where its namespace is.
    fn scope(&self) -> Scope<'_>;
    /// The worker identity the call acts as, which the caller's certificate must be allowed to
    /// use (worker calls only).
    fn acting_as(&self) -> Option<&str>;
}

/// The namespace a task token names ("" when it is malformed: the engine then says so).
pub(super) fn token_namespace(token: &[u8]) -> String {
    <pb::TaskToken as prost::Message>::decode(token)
        .map(|t| t.namespace)
        .unwrap_or_default()
}

macro_rules! scope {
    ($req:ident, namespace) => {
        Scope::Namespace(&$req.namespace)
    };
    ($req:ident, token) => {
        Scope::Tokens(vec![token_namespace(&$req.task_token)])
    };
    ($req:ident, outcomes) => {{
        let mut namespaces: Vec<String> = $req
            .outcomes
            .iter()
            .map(|o| token_namespace(&o.task_token))
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        Scope::Tokens(namespaces)
    }};
    ($req:ident, none) => {
        Scope::AnyGrant
    };
}

macro_rules! acting_as {
    ($req:ident) => {
        None
    };
    ($req:ident, $field:ident) => {
        Some(&$req.$field)
    };
}

/// `Method: Request => Role in <where> [as <worker identity field>];`
macro_rules! table {
    ($($method:literal: $request:ident => $role:ident in $where:ident $(as $field:ident)?;)*) => {
        $(
            impl Guarded for pb::$request {
                const ROLE: Role = Role::$role;
                fn scope(&self) -> Scope<'_> {
                    scope!(self, $where)
                }
                fn acting_as(&self) -> Option<&str> {
                    acting_as!(self $(, $field)?)
                }
            }
        )*
        /// Every RPC with the role it needs and where its namespace is, as the table says.
        #[cfg(test)]
        pub(super) const TABLE: &[(&str, Role, &str)] = &[$(($method, Role::$role, stringify!($where))),*];
    };
}

table! {
    // Namespaces: admins create and change them; any grant may list them.
    "RegisterNamespace": RegisterNamespaceRequest => Admin in namespace;
    "UpdateNamespace": UpdateNamespaceRequest => Admin in namespace;
    "ListNamespaces": ListNamespacesRequest => Client in none;
    // Workflows.
    "StartWorkflow": StartWorkflowRequest => Client in namespace;
    "SignalWorkflow": SignalWorkflowRequest => Client in namespace;
    "RequestCancelWorkflow": RequestCancelWorkflowRequest => Client in namespace;
    "TerminateWorkflow": TerminateWorkflowRequest => Admin in namespace;
    "DescribeWorkflow": DescribeWorkflowRequest => Client in namespace;
    "GetWorkflowHistory": GetWorkflowHistoryRequest => Client in namespace;
    "ListWorkflows": ListWorkflowsRequest => Client in namespace;
    "GetWorkflowResult": GetWorkflowResultRequest => Client in namespace;
    // Standalone activities.
    "StartActivity": StartActivityRequest => Client in namespace;
    "GetActivityResult": GetActivityResultRequest => Client in namespace;
    "DescribeActivity": DescribeActivityRequest => Client in namespace;
    "RequestCancelActivity": RequestCancelActivityRequest => Client in namespace;
    "TerminateActivity": TerminateActivityRequest => Admin in namespace;
    // What workers do, as the worker identity they name.
    "PollWorkflowTask": PollWorkflowTaskRequest => Worker in namespace as identity;
    "CompleteWorkflowTask": CompleteWorkflowTaskRequest => Worker in token as identity;
    "FailWorkflowTask": FailWorkflowTaskRequest => Worker in token;
    "PollActivityTask": PollActivityTaskRequest => Worker in namespace as identity;
    "HeartbeatActivity": HeartbeatActivityRequest => Worker in token as identity;
    "CompleteActivityTask": CompleteActivityTaskRequest => Worker in token as identity;
    "FailActivityTask": FailActivityTaskRequest => Worker in token as identity;
    "ReportActivityCanceled": ReportActivityCanceledRequest => Worker in token as identity;
    // A batch covers every namespace its outcomes are in: a worker sends outcomes only for the
    // namespaces it serves, so a refusal means a misconfigured worker, not one stale attempt.
    "RespondActivityTasks": RespondActivityTasksRequest => Worker in outcomes as identity;
    "RegisterWorker": RegisterWorkerRequest => Worker in namespace as identity;
    "WorkerHeartbeat": WorkerHeartbeatRequest => Worker in namespace as identity;
    "DeregisterWorker": DeregisterWorkerRequest => Worker in namespace as identity;
    // Queues and workers, seen by clients.
    "DescribeTaskQueue": DescribeTaskQueueRequest => Client in namespace;
    "ListWorkers": ListWorkersRequest => Client in namespace;
    "DescribeWorker": DescribeWorkerRequest => Client in namespace;
    // Sessions.
    "CreateSession": CreateSessionRequest => Client in namespace;
    "CompleteSession": CompleteSessionRequest => Client in namespace;
    "TerminateSession": TerminateSessionRequest => Client in namespace;
    "DescribeSession": DescribeSessionRequest => Client in namespace;
    "ListSessions": ListSessionsRequest => Client in namespace;
    // The cluster's shape (replicas, addresses, leases): any grant may see it.
    "DescribeCluster": DescribeClusterRequest => Client in none;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RPCs the public proto declares.
    fn declared_rpcs() -> Vec<String> {
        let proto = include_str!("../../../../proto/tether/v1/tether.proto");
        let service = &proto[proto.find("service TetherService").expect("the service")..];
        let service = &service[..service.find("\n}").expect("its end")];
        service
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l[..l.find('(').expect("rpc Name(")].to_string())
            .collect()
    }

    #[test]
    fn every_rpc_of_the_proto_has_exactly_one_rule() {
        let declared = declared_rpcs();
        assert!(declared.len() > 30, "read {declared:?} from the proto");
        let ruled: Vec<&str> = TABLE.iter().map(|(m, _, _)| *m).collect();
        let missing: Vec<&String> = declared
            .iter()
            .filter(|m| !ruled.contains(&m.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "RPCs without an authorization rule: {missing:?}"
        );
        let mut seen = std::collections::BTreeSet::new();
        for m in &ruled {
            assert!(seen.insert(m), "{m} has two rules");
            assert!(
                declared.iter().any(|d| d == m),
                "{m} has a rule but is no RPC of the proto"
            );
        }
    }

    #[test]
    fn terminating_needs_an_admin_and_workers_act_as_an_identity() {
        let role = |m: &str| TABLE.iter().find(|(n, _, _)| *n == m).unwrap().1;
        assert_eq!(role("TerminateWorkflow"), Role::Admin);
        assert_eq!(role("TerminateActivity"), Role::Admin);
        assert_eq!(role("RequestCancelWorkflow"), Role::Client);
        let poll = pb::PollActivityTaskRequest {
            namespace: "ns".into(),
            identity: "gpu-7".into(),
            ..Default::default()
        };
        assert_eq!(poll.acting_as(), Some("gpu-7"));
        assert!(matches!(poll.scope(), Scope::Namespace("ns")));
        let token = pb::TaskToken {
            namespace: "other".into(),
            ..Default::default()
        };
        let complete = pb::CompleteActivityTaskRequest {
            task_token: prost::Message::encode_to_vec(&token),
            ..Default::default()
        };
        assert!(matches!(complete.scope(), Scope::Tokens(n) if n == ["other"]));
    }

    #[test]
    fn every_handler_admits_its_request_before_anything_else() {
        let handlers = include_str!("mod.rs");
        let service = &handlers[handlers.find("impl TetherService for Frontend").unwrap()..];
        let mut seen = 0;
        for handler in service.split("    async fn ").skip(1) {
            let name = &handler[..handler.find('(').unwrap()];
            let body = &handler[handler.find('{').unwrap() + 1..];
            let first = body.trim_start().lines().next().unwrap_or("");
            assert!(
                first.contains("self.admit(request)?"),
                "handler {name} does not begin with the table's check: {first:?}"
            );
            seen += 1;
        }
        assert_eq!(seen, declared_rpcs().len(), "one handler per RPC");
    }
}
