//! mTLS: a valid client certificate works; no certificate, one from another CA, and an expired
//! one are refused with a clear error.

mod common;

use std::time::Duration;
use tether::client::{Client, ClientError, ClientOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::tls::{ClientTls, DevCa, ServerTls};

struct Pki {
    ca: DevCa,
    server: LocalServer,
    _dir: tempfile::TempDir,
}

async fn mtls_server() -> Pki {
    let ca = DevCa::new("test CA").unwrap();
    let (cert, key) = ca.server_cert(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        tls: Some(ServerTls {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: Some(ca.cert_pem.clone().into_bytes()),
        }),
        ..common::test_config()
    };
    let server = LocalServer::start("127.0.0.1:0", dir.path(), config)
        .await
        .unwrap();
    Pki {
        ca,
        server,
        _dir: dir,
    }
}

async fn connect(pki: &Pki, identity: Option<(String, String)>) -> Result<Client, ClientError> {
    let tls = ClientTls {
        ca_pem: Some(pki.ca.cert_pem.clone().into_bytes()),
        identity: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
        server_name: Some("localhost".into()),
    };
    tokio::time::timeout(
        Duration::from_secs(20),
        Client::connect_with(
            format!("127.0.0.1:{}", pki.server.addr().port()),
            ClientOptions {
                tls: Some(tls),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("connect does not hang")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_client_certificate_is_accepted() {
    let pki = mtls_server().await;
    let client = connect(&pki, Some(pki.ca.client_cert("worker-1", None).unwrap()))
        .await
        .unwrap();
    let ns = client.list_namespaces().await.unwrap();
    assert_eq!(ns[0].name, "default");
    client
        .start_workflow(
            "wf",
            &(),
            tether::client::WorkflowOptions::new("over-tls", "q"),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_foreign_and_expired_certificates_are_refused() {
    let pki = mtls_server().await;
    let err = connect(&pki, None)
        .await
        .err()
        .expect("no client certificate is refused");
    assert!(
        err.to_string().contains("requires a client certificate"),
        "{err}"
    );

    let other_ca = DevCa::new("someone else's CA").unwrap();
    let err = connect(&pki, Some(other_ca.client_cert("intruder", None).unwrap()))
        .await
        .err()
        .expect("a certificate from another CA is refused");
    assert!(err.to_string().contains("refused"), "{err}");

    let expired = pki
        .ca
        .client_cert(
            "old",
            Some(time::OffsetDateTime::now_utc() - time::Duration::days(1)),
        )
        .unwrap();
    let err = connect(&pki, Some(expired))
        .await
        .err()
        .expect("an expired certificate is refused");
    assert!(err.to_string().contains("refused"), "{err}");

    // A plaintext client cannot talk to the TLS server either.
    let plain = Client::connect_with(
        format!("127.0.0.1:{}", pki.server.addr().port()),
        ClientOptions::default(),
    )
    .await;
    if let Ok(c) = plain {
        assert!(c.list_namespaces().await.is_err());
    }
}

#[test]
fn certs_dev_writes_a_usable_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["certs", "dev", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
        "worker.pem",
        "admin.key",
    ] {
        assert!(dir.path().join(f).exists(), "{f} written");
    }
    let tls = ServerTls::from_files(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
        Some(&dir.path().join("ca.pem")),
    );
    assert!(tls.is_ok());
    let err = ServerTls::from_files(
        &dir.path().join("server.key"),
        &dir.path().join("server.key"),
        None,
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("is not a PEM certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_file_grants_roles_per_namespace() {
    let ca = DevCa::new("test CA").unwrap();
    let (cert, key) = ca.server_cert(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let access = tether::server::auth::Access::parse(
        r#"
        [[grant]]
        identity = "alice"
        namespace = "default"
        roles = ["client"]
        [[grant]]
        identity = "w1"
        namespace = "default"
        roles = ["worker"]
        [[grant]]
        identity = "root"
        namespace = "*"
        roles = ["admin"]
        "#,
        "test",
    )
    .unwrap();
    let config = ServerConfig {
        tls: Some(ServerTls {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: Some(ca.cert_pem.clone().into_bytes()),
        }),
        access: Some(std::sync::Arc::new(access)),
        ..common::test_config()
    };
    let server = LocalServer::start("127.0.0.1:0", dir.path(), config)
        .await
        .unwrap();
    let pki = Pki {
        ca,
        server,
        _dir: dir,
    };
    let as_ = |name: &str| pki.ca.client_cert(name, None).unwrap();
    let root = connect(&pki, Some(as_("root"))).await.unwrap();
    root.register_namespace("billing", "").await.unwrap();
    let alice = connect(&pki, Some(as_("alice"))).await.unwrap();
    let handle = alice
        .start_workflow("wf", &(), tether::client::WorkflowOptions::new("a-1", "q"))
        .await
        .unwrap();
    // Not granted: another namespace, an admin call, a worker call.
    let err = alice
        .with_namespace("billing")
        .start_workflow("wf", &(), tether::client::WorkflowOptions::new("a-2", "q"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(
        err.to_string()
            .contains("identity \"alice\" lacks role \"client\" in namespace \"billing\""),
        "{err}"
    );
    let err = handle.terminate("no").await.unwrap_err();
    assert!(err.to_string().contains("lacks role \"admin\""), "{err}");
    let err = alice
        .raw()
        .poll_activity_task(tether::api::pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "q".into(),
            identity: "alice".into(),
            poll_timeout_ms: 10,
            additional_task_queues: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("lacks role \"worker\""),
        "{}",
        err.message()
    );
    // The worker identity may poll, but not start workflows.
    let w1 = connect(&pki, Some(as_("w1"))).await.unwrap();
    let polled = w1
        .raw()
        .poll_workflow_task(tether::api::pb::PollWorkflowTaskRequest {
            namespace: "default".into(),
            task_queue: "q".into(),
            identity: "w1".into(),
            poll_timeout_ms: 5_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(polled.workflow_id, "a-1");
    // Signalling a workflow in another namespace needs the client role there: w1 has none.
    let err = w1
        .raw()
        .complete_workflow_task(tether::api::pb::CompleteWorkflowTaskRequest {
            task_token: polled.task_token.clone(),
            commands: vec![tether::api::pb::Command {
                kind: Some(tether::api::pb::command::Kind::SignalExternal(
                    tether::api::pb::SignalExternalCommand {
                        seq: 1,
                        namespace: "billing".into(),
                        workflow_id: "invoice-1".into(),
                        signal_name: "paid".into(),
                        input: None,
                    },
                )),
            }],
            identity: "w1".into(),
            sticky_queue: String::new(),
            next_task: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("lacks role \"client\" in namespace \"billing\""),
        "{}",
        err.message()
    );
    // Nor may it take its next task from a namespace it does not work in: asking for one with
    // a completion is checked like a poll there, and the completion is not applied.
    let err = w1
        .raw()
        .complete_workflow_task(tether::api::pb::CompleteWorkflowTaskRequest {
            task_token: polled.task_token.clone(),
            identity: "w1".into(),
            next_task: Some(tether::api::pb::NextWorkflowTaskRequest {
                namespace: "billing".into(),
                task_queues: vec!["q".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("lacks role \"worker\" in namespace \"billing\""),
        "{}",
        err.message()
    );
    let err = w1
        .raw()
        .respond_activity_tasks(tether::api::pb::RespondActivityTasksRequest {
            identity: "w1".into(),
            next_task: Some(tether::api::pb::NextTaskRequest {
                namespace: "billing".into(),
                task_queue: "q".into(),
                ..Default::default()
            }),
            max_next_tasks: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("lacks role \"worker\" in namespace \"billing\""),
        "{}",
        err.message()
    );
    assert_eq!(
        alice
            .raw()
            .describe_workflow(tether::api::pb::DescribeWorkflowRequest {
                namespace: "default".into(),
                workflow_id: "a-1".into(),
                run_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap()
            .status,
        tether::api::pb::ExecutionStatus::Running as i32,
        "the refused completion changed nothing"
    );
    let err = w1
        .start_workflow("wf", &(), tether::client::WorkflowOptions::new("w-1", "q"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lacks role \"client\""), "{err}");
    // An identity with no grant at all cannot even connect.
    let err = connect(&pki, Some(as_("mallory"))).await.err().unwrap();
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_cannot_be_swapped_in_where_authorization_is_off() {
    let env = common::TestEnv::start().await;
    let rules = tether::server::auth::Access::parse(
        "[[grant]]\nidentity = \"a\"\nnamespace = \"*\"\nroles = [\"admin\"]\n",
        "test",
    )
    .unwrap();
    let err = env
        .server
        .as_ref()
        .unwrap()
        .replace_access(rules)
        .unwrap_err();
    assert!(err.to_string().contains("--access"), "{err}");
    // Still open to everyone, as it started.
    env.client.list_namespaces().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_identity_is_bound_to_its_certificate() {
    let ca = DevCa::new("test CA").unwrap();
    let (cert, key) = ca.server_cert(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let access = tether::server::auth::Access::parse(
        r#"
        [[grant]]
        identity = "gpu-7"
        namespace = "default"
        roles = ["worker"]
        [[grant]]
        identity = "pool"
        namespace = "default"
        roles = ["worker"]
        worker_identities = ["batch-*"]
        "#,
        "test",
    )
    .unwrap();
    let config = ServerConfig {
        tls: Some(ServerTls {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: Some(ca.cert_pem.clone().into_bytes()),
        }),
        access: Some(std::sync::Arc::new(access)),
        ..common::test_config()
    };
    let server = LocalServer::start("127.0.0.1:0", dir.path(), config)
        .await
        .unwrap();
    let pki = Pki {
        ca,
        server,
        _dir: dir,
    };
    let as_ = |name: &str| pki.ca.client_cert(name, None).unwrap();
    let register = |identity: &str| tether::api::pb::RegisterWorkerRequest {
        namespace: "default".into(),
        identity: identity.into(),
        instance_id: format!("{identity}-process"),
        task_queues: vec!["q".into()],
        ..Default::default()
    };
    let gpu7 = connect(&pki, Some(as_("gpu-7"))).await.unwrap();
    let mut rpc = gpu7.raw();
    // Its own name, and its name followed by "-...", as the default identity is.
    rpc.register_worker(register("gpu-7")).await.unwrap();
    rpc.register_worker(register("gpu-7-3f2a9c1e"))
        .await
        .unwrap();
    // Another worker's identity, its host queue, its polls: refused.
    let err = rpc.register_worker(register("gpu-9")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("identity \"gpu-7\" may not act as worker \"gpu-9\""),
        "{}",
        err.message()
    );
    let err = rpc
        .poll_activity_task(tether::api::pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "host/gpu-9".into(),
            identity: "gpu-9".into(),
            poll_timeout_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = rpc
        .worker_heartbeat(tether::api::pb::WorkerHeartbeatRequest {
            namespace: "default".into(),
            identity: "gpu-9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // A grant that lists identities allows those, and only those.
    let pool = connect(&pki, Some(as_("pool"))).await.unwrap();
    let mut rpc = pool.raw();
    rpc.register_worker(register("batch-17")).await.unwrap();
    let err = rpc.register_worker(register("pool")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("\"batch-*\""), "{}", err.message());
}
