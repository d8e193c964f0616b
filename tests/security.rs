//! The security room through the real gateway in process: an encrypted model served to a token that
//! may use it, refused (PERMISSION_DENIED) to one that may not, whether or not the model exists, and
//! UNAUTHENTICATED without a token. Python's tests (test_encryption.py, test_authz.py) cover the
//! same with files made by an independent implementation and with tritonclient.
mod common;

use std::time::{Duration, Instant};

use common::{example_models, Client, TestServer};
use onnx_gateway::proto::{ModelMetadataRequest, RepositoryIndexRequest, ServerReadyRequest};
use onnx_gateway::security::model_crypto::{encrypt_model, ModelKey};
use onnx_gateway::Config;
use sha2::{Digest, Sha256};
use tonic::{Code, Request};

const READER: &str = "reader-token";
const OTHER: &str = "other-token";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("header value");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn wait_ready(client: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .server_ready(with_token(ServerReadyRequest {}, Some(READER)))
            .await
            .map(|r| r.into_inner().ready);
        if ready.unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < deadline, "gateway did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metadata(name: &str, token: Option<&str>) -> Request<ModelMetadataRequest> {
    let message = ModelMetadataRequest {
        name: name.into(),
        version: String::new(),
    };
    with_token(message, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_model_behind_a_per_model_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("sealed/1")).expect("mkdir");
    let config_text = std::fs::read_to_string(example_models().join("add_sub/config.pbtxt"))
        .expect("config")
        .replace("name: \"add_sub\"", "name: \"sealed\"");
    std::fs::write(repo.join("sealed/config.pbtxt"), config_text).expect("config");
    let key = ModelKey::from_bytes([7; 32]);
    let graph = std::fs::read(example_models().join("add_sub/1/model.onnx")).expect("graph");
    let sealed = encrypt_model(&key, &graph, "sealed", 1);
    std::fs::write(repo.join("sealed/1/model.onnx.enc"), sealed).expect("write");
    std::fs::write(dir.path().join("key"), hex(&[7; 32])).expect("key");
    let policy = serde_json::json!({"tokens": [
        {"name": "reader", "sha256": hex(&Sha256::digest(READER)), "models": ["sealed"]},
        {"name": "other", "sha256": hex(&Sha256::digest(OTHER)), "models": ["add_sub"]},
    ]});
    std::fs::write(dir.path().join("policy.json"), policy.to_string()).expect("policy");

    let mut config = Config::for_repository(&repo);
    config.security.model_key_files = vec![dir.path().join("key")];
    config.security.auth_policy_file = Some(dir.path().join("policy.json"));
    let server = TestServer::spawn(config).await;
    let mut client = server.client().await;
    wait_ready(&mut client).await;

    let served = client
        .model_metadata(metadata("sealed", Some(READER)))
        .await
        .expect("reader may read sealed");
    assert_eq!(served.into_inner().inputs.len(), 2);

    let forbidden = client
        .model_metadata(metadata("sealed", Some(OTHER)))
        .await
        .expect_err("other may not");
    let missing = client
        .model_metadata(metadata("absent", Some(OTHER)))
        .await
        .expect_err("absent");
    assert_eq!(forbidden.code(), Code::PermissionDenied);
    assert_eq!(missing.code(), Code::PermissionDenied);
    assert_eq!(
        forbidden.message().replace("sealed", "X"),
        missing.message().replace("absent", "X")
    );
    let anonymous = client
        .model_metadata(metadata("sealed", None))
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let index = |token| with_token(RepositoryIndexRequest::default(), Some(token));
    let seen = client.repository_index(index(OTHER)).await.expect("index");
    assert!(seen.into_inner().models.is_empty());
    let seen = client.repository_index(index(READER)).await.expect("index");
    let names: Vec<String> = seen
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["sealed"]);
    server.stop().await.expect("clean stop");
}
