"""Structural schemas of the custom resources we ship, for the fields we use.

kubernetes-validate knows only built-in kinds. These schemas are written from the
CRD references (prometheus-operator monitoring.coreos.com/v1 API docs; Strimzi
kafka.strimzi.io/v1beta2 "Custom resource API reference") and are deliberately
partial: every object, required field and type we set is checked, closed objects
(additionalProperties false) catch misspelt keys in the parts we write. They are not
the full CRDs; a cluster with the operators installed stays the final judge.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

_STR = {"type": "string"}
_INT = {"type": "integer"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                    "namespace": _STR,
                    "labels": _LABELS,
                    "annotations": _LABELS,
                },
                "additionalProperties": False,
            },
            "spec": spec,
        },
    }


_LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}

_RULE = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": _STR,
        "record": _STR,
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}

_RESOURCES = {
    "type": "object",
    "properties": {"requests": _LABELS, "limits": _LABELS},
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": _STR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": _STR,
                            "path": _STR,
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "scheme": {"enum": ["http", "https"]},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    ),
    "PrometheusRule": _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": _STR,
                            "interval": _DURATION,
                            "rules": {"type": "array", "items": _RULE},
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    ),
    "KafkaNodePool": _resource(
        "kafka.strimzi.io/v1beta2",
        "KafkaNodePool",
        {
            "type": "object",
            "required": ["replicas", "roles", "storage"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "roles": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["controller", "broker"]},
                },
                "storage": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"enum": ["ephemeral", "persistent-claim", "jbod"]},
                        "volumes": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["type"],
                                "properties": {
                                    "id": _INT,
                                    "type": {"enum": ["ephemeral", "persistent-claim"]},
                                    "size": _STR,
                                    "class": _STR,
                                    "deleteClaim": {"type": "boolean"},
                                    "kraftMetadata": {"enum": ["shared"]},
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
                "resources": _RESOURCES,
            },
            "additionalProperties": False,
        },
    ),
    "Kafka": _resource(
        "kafka.strimzi.io/v1beta2",
        "Kafka",
        {
            "type": "object",
            "required": ["kafka"],
            "properties": {
                "kafka": {
                    "type": "object",
                    "required": ["listeners"],
                    "properties": {
                        "version": _STR,
                        "metadataVersion": _STR,
                        "listeners": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "port", "type", "tls"],
                                "properties": {
                                    "name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                    "port": {"type": "integer", "minimum": 9092},
                                    "type": {
                                        "enum": [
                                            "internal",
                                            "route",
                                            "loadbalancer",
                                            "nodeport",
                                            "ingress",
                                            "cluster-ip",
                                        ]
                                    },
                                    "tls": {"type": "boolean"},
                                    "authentication": {"type": "object"},
                                    "networkPolicyPeers": {"type": "array"},
                                },
                                "additionalProperties": False,
                            },
                        },
                        "config": {
                            "type": "object",
                            "additionalProperties": {"type": ["string", "integer", "boolean"]},
                        },
                        "rack": {
                            "type": "object",
                            "required": ["topologyKey"],
                            "properties": {"topologyKey": _STR},
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
                "entityOperator": {
                    "type": "object",
                    "properties": {
                        "topicOperator": {"type": "object"},
                        "userOperator": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    ),
    "KafkaTopic": _resource(
        "kafka.strimzi.io/v1beta2",
        "KafkaTopic",
        {
            "type": "object",
            "properties": {
                "topicName": _STR,
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer", "boolean"]},
                },
            },
            "additionalProperties": False,
        },
    ),
}


def validate_custom_resource(obj: dict[str, Any], label: str) -> None:
    schema = SCHEMAS.get(obj["kind"])
    if schema is None:
        pytest.fail(f"{label}: no schema for custom resource kind {obj['kind']}")
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
    if errors:
        pytest.fail(f"{label}: {errors[0].message} at {list(errors[0].absolute_path)}")
    if obj["apiVersion"].startswith("kafka.strimzi.io/") and obj["kind"] != "Kafka":
        assert obj["metadata"]["labels"].get("strimzi.io/cluster"), f"{label}: strimzi.io/cluster"
