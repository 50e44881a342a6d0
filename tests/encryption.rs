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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_shows_encrypted_payloads_and_decodes_them_with_keys_or_a_codec_server() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let env = TestEnv::start().await;
    let key_file = env.dir.path().join("keys.txt");
    std::fs::write(&key_file, format!("k1 = {}\n", "07".repeat(32))).unwrap();
    let codec = AesGcmCodec::from_file(&key_file).unwrap();
    let client = client_with(&env, Some(codec)).await;
    client
        .start_workflow(
            "secret",
            &format!("cli {MARKER}"),
            WorkflowOptions::new("cli-1", "enc"),
        )
        .await
        .unwrap();
    let bin = env!("CARGO_BIN_EXE_tether");
    let addr = env.listen.clone();
    let history = move |extra: Vec<String>| {
        let out = Command::new(bin)
            .args([
                "--address",
                &addr,
                "workflow",
                "history",
                "--id",
                "cli-1",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (plain, with_keys) = tokio::task::spawn_blocking({
        let history = history.clone();
        let key_file = key_file.clone();
        move || {
            (
                history(vec![]),
                history(vec!["--keys".into(), key_file.display().to_string()]),
            )
        }
    })
    .await
    .unwrap();
    assert!(!plain.contains(MARKER), "no keys: nothing decoded");
    assert!(plain.contains("\"key_id\": \"k1\""), "{plain}");
    assert!(with_keys.contains(MARKER), "{with_keys}");

    // The same through a codec server, which holds the keys instead of the CLI.
    let mut server = Command::new(bin)
        .args([
            "codec-server",
            "--keys",
            key_file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("tether codec server listening on ") {
                return format!("http://{}", rest.split_whitespace().next().unwrap());
            }
        }
        panic!("codec server did not start");
    })
    .await
    .unwrap();
    let via_server =
        tokio::task::spawn_blocking(move || history(vec!["--codec-server".into(), url]))
            .await
            .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(via_server.contains(MARKER), "{via_server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_messages_can_be_encoded_too() {
    let mut env = TestEnv::start().await;
    let dc = DataConverter::default()
        .with_codec(Arc::new(tether::codec::CompressionCodec::default()))
        .with_codec(Arc::new(AesGcmCodec::new("k1", [6u8; 32])))
        .encode_failure_attributes(true);
    let client = Client::connect_with(
        env.url(),
        ClientOptions {
            data_converter: dc,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut w = Worker::new(
        client.clone(),
        WorkerOptions::new("enc3").identity("failing"),
    );
    w.register_activity("leaky", |_ctx: ActivityContext, _: ()| async move {
        Err::<(), _>(
            ActivityError::non_retryable(format!("bad row {MARKER}")).with_type("RowError"),
        )
    });
    w.register_workflow("fails", |ctx: WorkflowContext, _: ()| async move {
        let r: Result<(), tether::workflow::WorkflowError> = ctx
            .execute_activity("leaky", &(), ActivityOptions::default())
            .await;
        match r {
            Err(tether::workflow::WorkflowError::Activity(f)) => {
                Err::<(), _>(tether::workflow::WorkflowError::failed(format!(
                    "{} / {}",
                    f.message, f.error_type
                )))
            }
            other => Err(tether::workflow::WorkflowError::failed(format!(
                "unexpected {other:?}"
            ))),
        }
    });
    let worker = w.start().unwrap();
    let handle = client
        .start_workflow("fails", &(), WorkflowOptions::new("fails-1", "enc3"))
        .await
        .unwrap();
    let err = within(T, "failure", handle.result::<()>())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("bad row {MARKER} / RowError")),
        "the client reads it: {text}"
    );
    // The server only sees a placeholder.
    let plain = client_with(&env, None).await;
    let d = plain
        .workflow_handle("fails-1", "")
        .describe()
        .await
        .unwrap();
    assert_eq!(d.failure.unwrap().message, "encoded failure");
    worker.shutdown().await;
    env.restart().await;
    let hits = files_containing(env.dir.path(), MARKER.as_bytes());
    assert!(hits.is_empty(), "failure text found in {hits:?}");
}

#[test]
fn codec_server_refuses_a_non_loopback_address_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.txt");
    std::fs::write(
        &key_file,
        format!("k1 = {}\n", tether::codec::AesGcmCodec::generate_key_hex()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "codec-server",
            "--keys",
            key_file.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-remote"), "{err}");
    assert!(err.contains("decrypts for anyone"), "{err}");
}
