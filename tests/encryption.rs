//! With the AES-256-GCM codec, the server stores and forwards only ciphertext: a marker that
//! travels in workflow input, signals, activity results and the workflow result appears nowhere
//! in the server's data directory, while clients and workers see the plain values.

mod common;

use common::{within, TestEnv};
use std::sync::Arc;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::api::pb::history_event::Attributes;
use tether::client::{ActivityOptions, Client, ClientOptions, WorkflowOptions};
use tether::codec::{AesGcmCodec, DataConverter, ENCRYPTED_ENCODING, KEY_ID_KEY};
use tether::worker::{Worker, WorkerOptions};
use tether::workflow::WorkflowContext;

const MARKER: &str = "TOP-SECRET-MARKER-7f3a9c";
const T: Duration = Duration::from_secs(30);

async fn client_with(env: &TestEnv, codec: Option<AesGcmCodec>) -> Client {
    let mut dc = DataConverter::default();
    if let Some(c) = codec {
        dc = dc.with_codec(Arc::new(c));
    }
    Client::connect_with(
        env.url(),
        ClientOptions {
            identity: "enc-test".into(),
            data_converter: dc,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hits.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_payloads_never_reach_the_servers_storage_in_plaintext() {
    let mut env = TestEnv::start().await;
    let k1 = [7u8; 32];
    let client = client_with(&env, Some(AesGcmCodec::new("k1", k1))).await;
    let mut w = Worker::new(
        client.clone(),
        WorkerOptions::new("enc").identity("enc-worker"),
    );
    w.register_activity("echo", |_ctx: ActivityContext, text: String| async move {
        Ok::<_, ActivityError>(format!("{text} (seen by the activity)"))
    });
    w.register_workflow("secret", |ctx: WorkflowContext, input: String| async move {
        let echoed: String = ctx
            .execute_activity("echo", &input, ActivityOptions::default())
            .await?;
        let extra: String = ctx.signal_channel("more").recv().await?;
        let noted: String = ctx.side_effect(|| format!("{MARKER} in a side effect"))?;
        Ok(format!("{echoed} + {extra} + {noted}"))
    });
    let worker = w.start().unwrap();
    let handle = client
        .start_workflow(
            "secret",
            &format!("input {MARKER}"),
            WorkflowOptions::new("secret-1", "enc"),
        )
        .await
        .unwrap();
    handle
        .signal("more", &format!("signal {MARKER}"))
        .await
        .unwrap();
    let out: String = within(T, "result", handle.result()).await.unwrap();
    assert!(
        out.contains(&format!("input {MARKER} (seen by the activity)")),
        "{out}"
    );
    assert!(out.contains(&format!("signal {MARKER}")), "{out}");

    // What the server holds: ciphertext naming its key.
    let plain_client = client_with(&env, None).await;
    let history = plain_client
        .workflow_handle("secret-1", "")
        .history()
        .await
        .unwrap();
    let started = history
        .iter()
        .find_map(|e| match &e.attributes {
            Some(Attributes::WorkflowExecutionStarted(s)) => s.input.clone(),
            _ => None,
        })
        .unwrap();
    assert_eq!(tether::codec::encoding_of(&started), ENCRYPTED_ENCODING);
    assert_eq!(started.metadata[KEY_ID_KEY], b"k1");
    worker.shutdown().await;

    // Stop the server so every file (database, WAL, shared memory) is settled, then search them.
    env.restart().await;
    let hits = files_containing(env.dir.path(), MARKER.as_bytes());
    assert!(hits.is_empty(), "plaintext found in {hits:?}");
    // The check can fail: without the codec the marker does land on disk.
    let plain = client_with(&env, None).await;
    plain
        .start_workflow(
            "secret",
            &format!("plain {MARKER}"),
            WorkflowOptions::new("plain-1", "enc"),
        )
        .await
        .unwrap();
    env.restart().await;
    assert!(!files_containing(env.dir.path(), MARKER.as_bytes()).is_empty());

    // Rotation: a converter that knows k1 and encrypts with k2 still reads the old result.
    let rotated = AesGcmCodec::new("k1", k1)
        .with_key("k2", [9u8; 32])
        .activate("k2")
        .unwrap();
    let rotated_client = client_with(&env, Some(rotated)).await;
    let again: String = rotated_client
        .workflow_handle("secret-1", "")
        .result()
        .await
        .unwrap();
    assert_eq!(again, out);
    // A wrong key fails clearly, naming the key id, instead of returning garbage.
    let stranger = client_with(&env, Some(AesGcmCodec::new("k3", [3u8; 32]))).await;
    let err = stranger
        .workflow_handle("secret-1", "")
        .result::<String>()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("key \"k1\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_key_fails_the_attempt_clearly() {
    let env = TestEnv::start().await;
    let client = client_with(&env, Some(AesGcmCodec::new("k1", [1u8; 32]))).await;
    let keyless = client_with(&env, Some(AesGcmCodec::new("other", [2u8; 32]))).await;
    let mut w = Worker::new(keyless, WorkerOptions::new("enc2").identity("keyless"));
    w.register_activity("echo", |_ctx: ActivityContext, s: String| async move {
        Ok::<_, ActivityError>(s)
    });
    let worker = w.start().unwrap();
    let mut options = tether::client::StandaloneActivityOptions::new("a-1", "enc2");
    options.options = ActivityOptions::default().retry(tether::client::RetryPolicy {
        maximum_attempts: 1,
        ..Default::default()
    });
    let err = within(
        T,
        "activity",
        client.execute_activity::<_, String>("echo", "x", options),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("could not decode") && text.contains("\"k1\""),
        "{text}"
    );
    worker.shutdown().await;
}
