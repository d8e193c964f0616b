//! Execution providers: a model that asks for a GPU on a build or machine without CUDA fails its load
//! with a clear reason instead of silently running on the CPU.
mod common;

use common::*;
use onnx_gateway::Config;

fn add_sub_repo_with(instance_group: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gpu_add_sub");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        example_models().join("add_sub/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    let config = std::fs::read_to_string(example_models().join("add_sub/config.pbtxt")).unwrap();
    let config = config.replace("name: \"add_sub\"", "name: \"gpu_add_sub\"");
    let start = config.find("instance_group").unwrap();
    let config = format!("{}{instance_group}\n{extra}\n", &config[..start]);
    std::fs::write(model.join("config.pbtxt"), config).unwrap();
    dir
}

async fn load_failure_reason(repo: &std::path::Path) -> String {
    let mut config = Config::for_repository(repo);
    config.models.exit_on_error = false;
    config.models.strict_readiness = false;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let row = index_row(&mut client, "gpu_add_sub").await;
    server.stop().await.unwrap();
    assert_eq!(row.state, "UNAVAILABLE", "{row:?}");
    row.reason
}

#[tokio::test]
async fn gpu_instance_without_cuda_fails_the_load_with_a_reason() {
    let repo = add_sub_repo_with("instance_group [ { count: 1, kind: KIND_GPU } ]", "");
    let reason = load_failure_reason(repo.path()).await;
    assert!(
        reason.contains("CUDA") || reason.contains("provider"),
        "{reason}"
    );
}

#[tokio::test]
async fn unknown_gpu_accelerator_is_refused_by_name() {
    let repo = add_sub_repo_with(
        "instance_group [ { count: 1, kind: KIND_GPU } ]",
        "optimization { execution_accelerators { gpu_execution_accelerator [ { name: \"warp_drive\" } ] } }",
    );
    let reason = load_failure_reason(repo.path()).await;
    assert!(reason.contains("warp_drive"), "{reason}");
}
