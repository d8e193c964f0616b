use super::*;
use crate::proto::model_ensembling::Step;
use crate::proto::{DataType as C, ModelEnsembling, ModelInput, ModelOutput};

fn spec(name: &str, dtype: DataType) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        dims: vec![-1],
        reshape: None,
    }
}

fn step(model: &str, inputs: &[(&str, &str)], outputs: &[(&str, &str)]) -> Step {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Step {
        model_name: model.into(),
        model_version: -1,
        input_map: map(inputs),
        output_map: map(outputs),
        ..Default::default()
    }
}

fn ensemble(inputs: &[&str], outputs: &[&str], steps: Vec<Step>) -> ModelConfig {
    ModelConfig {
        name: "ens".into(),
        platform: ENSEMBLE_PLATFORM.into(),
        max_batch_size: 8,
        input: inputs
            .iter()
            .map(|n| ModelInput {
                name: n.to_string(),
                data_type: C::TypeFp32 as i32,
                dims: vec![4],
                ..Default::default()
            })
            .collect(),
        output: outputs
            .iter()
            .map(|n| ModelOutput {
                name: n.to_string(),
                data_type: C::TypeFp32 as i32,
                dims: vec![4],
                ..Default::default()
            })
            .collect(),
        scheduling_choice: Some(SchedulingChoice::EnsembleScheduling(ModelEnsembling {
            step: steps,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// `unary` (x -> y), `binary` (a, b -> s, d), `ints` (x -> y as INT64), `nested` (an ensemble).
fn resolve(name: &str, version: i64) -> Result<StepModel, String> {
    let fp = DataType::Fp32;
    let model = |inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>| StepModel {
        max_batch_size: 8,
        inputs,
        outputs,
        is_ensemble: false,
    };
    if version > 1 {
        return Err(format!("version {version} is not loaded"));
    }
    match name {
        "unary" => Ok(model(vec![spec("x", fp)], vec![spec("y", fp)])),
        "binary" => Ok(model(
            vec![spec("a", fp), spec("b", fp)],
            vec![spec("s", fp), spec("d", fp)],
        )),
        "ints" => Ok(model(vec![spec("x", fp)], vec![spec("y", DataType::Int64)])),
        "small" => Ok(StepModel {
            max_batch_size: 4,
            ..model(vec![spec("x", fp)], vec![spec("y", fp)])
        }),
        "nested" => Ok(StepModel {
            is_ensemble: true,
            ..model(vec![spec("x", fp)], vec![spec("y", fp)])
        }),
        other => Err(format!("model '{other}' is not loaded")),
    }
}

fn refusal(config: &ModelConfig) -> String {
    plan(config, resolve).unwrap_err().to_string()
}

#[test]
fn a_chain_is_planned_in_order() {
    let c = ensemble(
        &["IN"],
        &["OUT"],
        vec![
            step("unary", &[("x", "IN")], &[("y", "mid")]),
            step("unary", &[("x", "mid")], &[("y", "OUT")]),
        ],
    );
    let p = plan(&c, resolve).unwrap();
    assert_eq!(p.steps.len(), 2);
    assert_eq!(p.steps[0].inputs, vec![("x".into(), "IN".into())]);
    assert_eq!(p.steps[1].inputs, vec![("x".into(), "mid".into())]);
    assert_eq!(p.steps[1].version, "");
    assert_eq!(
        (p.inputs, p.outputs),
        (vec!["IN".into()], vec!["OUT".into()])
    );
}

#[test]
fn steps_written_out_of_order_are_sorted_into_a_dag() {
    // A diamond written backwards: join needs both branches, which need the split.
    let c = ensemble(
        &["IN"],
        &["OUT"],
        vec![
            step("binary", &[("a", "l"), ("b", "r")], &[("s", "OUT")]),
            step("unary", &[("x", "IN")], &[("y", "l")]),
            step("unary", &[("x", "IN")], &[("y", "r")]),
        ],
    );
    let p = plan(&c, resolve).unwrap();
    let producers: Vec<&str> = p.steps.iter().map(|s| s.outputs[0].1.as_str()).collect();
    assert_eq!(producers, vec!["l", "r", "OUT"]);
}

#[test]
fn a_pinned_version_is_routed_to_that_version() {
    let mut s = step("unary", &[("x", "IN")], &[("y", "OUT")]);
    s.model_version = 1;
    let p = plan(&ensemble(&["IN"], &["OUT"], vec![s.clone()]), resolve).unwrap();
    assert_eq!(p.steps[0].version, "1");
    s.model_version = 3;
    let got = refusal(&ensemble(&["IN"], &["OUT"], vec![s]));
    assert_eq!(
        got,
        "ensemble step 0 (model 'unary'): version 3 is not loaded"
    );
}

#[test]
fn refusals_name_the_step() {
    let cases = [
        (
            vec![step("missing", &[("x", "IN")], &[("y", "OUT")])],
            "ensemble step 0 (model 'missing'): model 'missing' is not loaded",
        ),
        (
            vec![step("unary", &[("z", "IN")], &[("y", "OUT")])],
            "ensemble step 0 (model 'unary'): input_map names input 'z', which the composing model does not have",
        ),
        (
            vec![step("unary", &[], &[("y", "OUT")])],
            "ensemble step 0 (model 'unary'): input_map does not feed the composing model's input 'x'",
        ),
        (
            vec![step("unary", &[("x", "IN")], &[("q", "OUT")])],
            "ensemble step 0 (model 'unary'): output_map names output 'q'",
        ),
        (
            vec![step("unary", &[("x", "nowhere")], &[("y", "OUT")])],
            "ensemble step 0 (model 'unary'): input 'x' reads 'nowhere', which is neither",
        ),
        (
            vec![
                step("unary", &[("x", "IN")], &[("y", "OUT")]),
                step("unary", &[("x", "IN")], &[("y", "OUT")]),
            ],
            "ensemble step 1 (model 'unary'): output 'y' maps to 'OUT', which step 0 already produces",
        ),
        (
            vec![step("unary", &[("x", "IN")], &[("y", "IN")])],
            "ensemble step 0 (model 'unary'): output 'y' maps to 'IN', which is an ensemble input",
        ),
        (
            vec![
                step("ints", &[("x", "IN")], &[("y", "mid")]),
                step("unary", &[("x", "mid")], &[("y", "OUT")]),
            ],
            "ensemble step 1 (model 'unary'): input 'x' is FP32 but 'mid' is INT64",
        ),
        (
            vec![step("nested", &[("x", "IN")], &[("y", "OUT")])],
            "ensemble step 0 (model 'nested'): the composing model is itself an ensemble",
        ),
        (
            vec![step("small", &[("x", "IN")], &[("y", "OUT")])],
            "ensemble step 0 (model 'small'): the ensemble's max_batch_size 8 exceeds the composing model's 4",
        ),
        (
            vec![step("unary", &[("x", "IN")], &[])],
            "ensemble step 0 (model 'unary'): output_map is empty",
        ),
    ];
    for (steps, expected) in cases {
        let got = refusal(&ensemble(&["IN"], &["OUT"], steps));
        assert!(
            got.starts_with(expected),
            "{got}\n  should start with\n{expected}"
        );
    }
}

#[test]
fn ensemble_level_refusals() {
    let unproduced = ensemble(
        &["IN"],
        &["OUT", "OTHER"],
        vec![step("unary", &[("x", "IN")], &[("y", "OUT")])],
    );
    assert_eq!(
        refusal(&unproduced),
        "ensemble output 'OTHER' is not produced by any step's output_map"
    );
    let cycle = ensemble(
        &["IN"],
        &["OUT"],
        vec![
            step(
                "binary",
                &[("a", "IN"), ("b", "back")],
                &[("s", "OUT"), ("d", "fwd")],
            ),
            step("unary", &[("x", "fwd")], &[("y", "back")]),
        ],
    );
    assert!(refusal(&cycle).starts_with("the steps form a cycle"));
    let mut wrong_type = ensemble(
        &["IN"],
        &["OUT"],
        vec![step("ints", &[("x", "IN")], &[("y", "OUT")])],
    );
    assert_eq!(
        refusal(&wrong_type),
        "ensemble output 'OUT' is FP32 but the step producing it gives INT64"
    );
    wrong_type.scheduling_choice = None;
    assert!(refusal(&wrong_type).contains("needs an ensemble_scheduling block"));
    let no_steps = ensemble(&["IN"], &["OUT"], vec![]);
    assert!(refusal(&no_steps).contains("must have 1 to 64 steps"));
    let own = ensemble(
        &["IN"],
        &["OUT"],
        vec![step("ens", &[("x", "IN")], &[("y", "OUT")])],
    );
    assert!(refusal(&own).contains("cannot be its own step"));
}
