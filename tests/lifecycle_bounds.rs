//! The model manager's lifecycle under races, in one process with real ONNX Runtime sessions: an
//! unload racing a load never resurrects the model, a shutdown during a load installs nothing and
//! refuses later loads, a load past its timeout fails cleanly, config bounds fail before any session
//! is built. The same failures through the real binary are in tests/python/test_hardening_lifecycle.py.
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use onnx_gateway::model::bounds::ConfigLimits;
use onnx_gateway::model::manager::{ManagerSettings, ModelManager, ModelState};
use onnx_gateway::model::ModelError;
use onnx_gateway::runtime::init_onnxruntime;

fn manager_with(repo: &Path, settings: ManagerSettings) -> Arc<ModelManager> {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    Arc::new(ModelManager::new(ManagerSettings {
        repository: repo.to_path_buf(),
        ..settings
    }))
}

fn manager(repo: &Path) -> Arc<ModelManager> {
    manager_with(repo, ManagerSettings::default())
}

/// Waits (yielding, no sleeps) until the index shows the model loading.
async fn until_loading(models: &ModelManager, name: &str) {
    loop {
        let rows = models.index().await;
        if rows
            .iter()
            .any(|r| r.name == name && r.state == ModelState::Loading)
        {
            return;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_racing_a_load_waits_for_it_and_the_model_stays_unloaded() {
    let repo = repo_with(&["mlp_bench"]);
    let models = manager(repo.path());
    for _ in 0..3 {
        let load = tokio::spawn({
            let models = Arc::clone(&models);
            async move { models.load("mlp_bench", None).await }
        });
        tokio::time::timeout(Duration::from_secs(60), until_loading(&models, "mlp_bench"))
            .await
            .expect("the load starts");
        models
            .unload("mlp_bench")
            .await
            .expect("unload waits for the load, then unloads it");
        load.await.unwrap().expect("the load itself succeeded");
        assert!(
            models.get("mlp_bench", "").is_err(),
            "the load resurrected the model"
        );
        assert!(models.loaded().is_empty());
    }
    models.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_of_one_model_are_serialized_and_both_succeed() {
    let repo = repo_with(&["add_sub"]);
    let models = manager(repo.path());
    let (a, b) = tokio::join!(models.load("add_sub", None), models.load("add_sub", None));
    a.unwrap();
    b.unwrap();
    assert_eq!(models.loaded().len(), 1, "one version serves, not two");
    assert!(models.all_ready());
    models.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_load_installs_nothing_and_refuses_later_loads() {
    let repo = repo_with(&["mlp_bench"]);
    let models = manager(repo.path());
    let load = tokio::spawn({
        let models = Arc::clone(&models);
        async move { models.load("mlp_bench", None).await }
    });
    tokio::time::timeout(Duration::from_secs(60), until_loading(&models, "mlp_bench"))
        .await
        .expect("the load starts");
    models.shutdown().await;
    let result = load.await.unwrap();
    assert!(
        matches!(result, Err(ModelError::LoadCancelled { .. })),
        "{result:?}"
    );
    assert!(models.loaded().is_empty());
    let later = models.load("mlp_bench", None).await;
    assert!(
        matches!(later, Err(ModelError::LoadCancelled { .. })),
        "{later:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_past_its_timeout_fails_and_is_reported() {
    let repo = repo_with(&["mlp_bench"]);
    let models = manager_with(
        repo.path(),
        ManagerSettings {
            // Shorter than building any session: the load cannot finish in time.
            load_timeout: Duration::from_nanos(1),
            ..ManagerSettings::default()
        },
    );
    let error = models.load("mlp_bench", None).await.unwrap_err();
    assert!(
        matches!(error, ModelError::LoadTimedOut { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("--model-load-timeout-secs"));
    assert!(models.get("mlp_bench", "").is_err());
    let rows = models.index().await;
    assert!(
        rows.iter()
            .any(|r| r.state == ModelState::Unavailable && r.reason.contains("timeout")),
        "{rows:?}"
    );
    // The next load waits for the abandoned build to stop (it holds the model's lifecycle lock)
    // and also times out; nothing is ever installed.
    assert!(models.load("mlp_bench", None).await.is_err());
    assert!(models.loaded().is_empty());
    models.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_count_over_the_bound_fails_before_any_session_and_keeps_the_old_version() {
    let repo = repo_with(&["add_sub"]);
    let models = manager_with(
        repo.path(),
        ManagerSettings {
            limits: ConfigLimits {
                max_instances_per_model: 4,
            },
            ..ManagerSettings::default()
        },
    );
    models.load("add_sub", None).await.unwrap();
    let mut config = models.get("add_sub", "").unwrap().config.clone();
    config.instance_group[0].count = 100_000;
    let error = models.load("add_sub", Some(config)).await.unwrap_err();
    assert!(
        matches!(error, ModelError::InvalidConfig { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("instance_group[0].count"),
        "{error}"
    );
    assert!(models.get("add_sub", "").is_ok(), "the old version serves");
    assert!(models.all_ready());
    models.shutdown().await;
}
