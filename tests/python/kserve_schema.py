"""JSON schemas of the custom resources deploy/kserve uses, written down from the CRDs KServe
(serving.kserve.io: ClusterServingRuntime v1alpha1, InferenceService v1beta1) and KEDA (keda.sh:
ScaledObject v1alpha1) publish, for offline validation in tests/python/test_deploy_kserve.py.

Only the KServe- and KEDA-specific parts are spelled out here, strictly (an unknown field is an error,
as a typo would be silently dropped by the API server's pruning). The embedded Kubernetes types (the
runtime's containers, the predictor's pod fields, the model's container fields) are validated with
kubernetes-validate against the real Kubernetes schemas instead, by test_deploy_kserve.py.

Why not the `kserve` PyPI package's models: kserve 0.21 pulls in fastapi, pandas, grpcio-tools and
cryptography>=50, which conflicts with this project's pinned cryptography (tests/python/requirements.txt),
and its generated models accept unknown keys anyway.
"""
from __future__ import annotations

import jsonschema

STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": STRING}
OBJECT = {"type": "object"}
ARRAY = {"type": "array"}


def integer(minimum: int | None = None, maximum: int | None = None) -> dict:
    schema: dict = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


# KServe's InferenceServiceProtocol values.
PROTOCOL_VERSIONS = ["v1", "v2", "grpc-v1", "grpc-v2"]
# The storage initializer's URI schemes (pkg/storage in KServe's Python storage package).
STORAGE_URI = {"type": "string", "pattern": r"^(gs|s3|pvc|hdfs|webhdfs|https?|oci|hf|azure)://\S+$"}
# Kubernetes metadata, the fields manifests in this repository may set.
OBJECT_META = strict(
    {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": STRING,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    required=("name",),
)


def resource(api_version: str, kinds: list[str], spec: dict) -> dict:
    return strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"enum": kinds},
            "metadata": OBJECT_META,
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


# --- serving.kserve.io/v1alpha1 ServingRuntime / ClusterServingRuntime --------------------------------

SUPPORTED_MODEL_FORMAT = strict(
    {
        "name": STRING,
        "version": STRING,
        "autoSelect": BOOLEAN,
        # Only considered with autoSelect; must be greater than zero.
        "priority": integer(minimum=1),
    },
    required=("name",),
)

SERVING_RUNTIME_SPEC = strict(
    {
        "supportedModelFormats": {"type": "array", "items": SUPPORTED_MODEL_FORMAT},
        "protocolVersions": {"type": "array", "items": {"enum": PROTOCOL_VERSIONS}, "uniqueItems": True},
        "multiModel": BOOLEAN,
        "disabled": BOOLEAN,
        "annotations": STRING_MAP,
        "labels": STRING_MAP,
        "grpcEndpoint": STRING,
        "grpcDataEndpoint": STRING,
        "httpDataEndpoint": STRING,
        "replicas": integer(minimum=0),
        "storageHelper": strict({"disabled": BOOLEAN}),
        "builtInAdapter": OBJECT,
        "hostIPC": BOOLEAN,
        "schedulerName": STRING,
        "workerSpec": OBJECT,
        # Kubernetes types, validated by kubernetes-validate.
        "containers": {"type": "array", "minItems": 1, "items": OBJECT},
        "volumes": ARRAY,
        "nodeSelector": STRING_MAP,
        "affinity": OBJECT,
        "tolerations": ARRAY,
        "imagePullSecrets": ARRAY,
        "resourceClaims": ARRAY,
    },
    required=("containers",),
)

CLUSTER_SERVING_RUNTIME = resource(
    "serving.kserve.io/v1alpha1", ["ClusterServingRuntime", "ServingRuntime"], SERVING_RUNTIME_SPEC
)

# --- serving.kserve.io/v1beta1 InferenceService ------------------------------------------------------

# The model's own fields; every other key of `model` is a Kubernetes Container field.
MODEL_FIELDS = {
    "modelFormat": strict({"name": STRING, "version": STRING}, required=("name",)),
    "runtime": STRING,
    "runtimeVersion": STRING,
    "protocolVersion": {"enum": PROTOCOL_VERSIONS},
    "storageUri": STORAGE_URI,
    "storage": strict(
        {"key": STRING, "path": STRING, "schemaPath": STRING, "parameters": STRING_MAP}
    ),
}

# The predictor's own fields; every other key is a Kubernetes PodSpec field.
PREDICTOR_FIELDS = {
    "model": OBJECT,
    "minReplicas": integer(minimum=0),
    "maxReplicas": integer(minimum=0),
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "scaleMetricType": {"enum": ["Utilization", "Value", "AverageValue"]},
    "scaleTarget": integer(minimum=1),
    "containerConcurrency": integer(minimum=0),
    "timeout": integer(minimum=0),
    "canaryTrafficPercent": integer(minimum=0, maximum=100),
    "logger": OBJECT,
    "batcher": OBJECT,
    "autoScaling": OBJECT,
    "deploymentStrategy": OBJECT,
    "annotations": STRING_MAP,
    "labels": STRING_MAP,
    "storageUris": ARRAY,
    "workerSpec": OBJECT,
    # The per-framework shorthands (each one a model spec of its own kind).
    **{
        name: OBJECT
        for name in (
            "sklearn",
            "xgboost",
            "tensorflow",
            "pytorch",
            "triton",
            "onnx",
            "huggingface",
            "pmml",
            "lightgbm",
            "paddle",
        )
    },
}

INFERENCE_SERVICE = resource(
    "serving.kserve.io/v1beta1",
    ["InferenceService"],
    strict(
        {"predictor": OBJECT, "transformer": OBJECT, "explainer": OBJECT},
        required=("predictor",),
    ),
)

# KServe's annotations with a fixed set of values.
DEPLOYMENT_MODES = {"RawDeployment", "Standard", "Serverless", "Knative", "ModelMesh"}
AUTOSCALER_CLASSES = {"hpa", "kpa", "external", "keda", "none"}

# --- keda.sh/v1alpha1 ScaledObject ---------------------------------------------------------------------

SCALING_POLICY = strict(
    {"type": {"enum": ["Pods", "Percent"]}, "value": integer(minimum=1), "periodSeconds": integer(1, 1800)},
    required=("type", "value", "periodSeconds"),
)
SCALING_RULES = strict(
    {
        "stabilizationWindowSeconds": integer(0, 3600),
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": SCALING_POLICY},
    }
)
SCALED_OBJECT_SPEC = strict(
    {
        "scaleTargetRef": strict(
            {"apiVersion": STRING, "kind": STRING, "name": STRING, "envSourceContainerName": STRING},
            required=("name",),
        ),
        "pollingInterval": integer(minimum=1),
        "cooldownPeriod": integer(minimum=0),
        "initialCooldownPeriod": integer(minimum=0),
        "idleReplicaCount": integer(minimum=0),
        "minReplicaCount": integer(minimum=0),
        "maxReplicaCount": integer(minimum=1),
        "fallback": strict(
            {"failureThreshold": integer(minimum=1), "replicas": integer(minimum=0)},
            required=("failureThreshold", "replicas"),
        ),
        "advanced": strict(
            {
                "restoreToOriginalReplicaCount": BOOLEAN,
                "horizontalPodAutoscalerConfig": strict(
                    {
                        "name": STRING,
                        "behavior": strict({"scaleUp": SCALING_RULES, "scaleDown": SCALING_RULES}),
                    }
                ),
                "scalingModifiers": OBJECT,
            }
        ),
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": strict(
                {
                    "type": STRING,
                    "name": STRING,
                    "metadata": STRING_MAP,
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": BOOLEAN,
                    "authenticationRef": strict({"name": STRING, "kind": STRING}, required=("name",)),
                },
                required=("type", "metadata"),
            ),
        },
    },
    required=("scaleTargetRef", "triggers"),
)
SCALED_OBJECT = resource("keda.sh/v1alpha1", ["ScaledObject"], SCALED_OBJECT_SPEC)

# KEDA's Prometheus scaler: its metadata keys, and the ones it cannot work without.
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress",
    "query",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "queryParameters",
    "unsafeSsl",
    "authModes",
}
PROMETHEUS_TRIGGER_REQUIRED = {"serverAddress", "query", "threshold"}

SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): CLUSTER_SERVING_RUNTIME,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): CLUSTER_SERVING_RUNTIME,
    ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}


def validation_errors(schema: dict, instance, where: str) -> list[str]:
    """Every schema violation, each as `where: path: message`."""
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{where}: {'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]
