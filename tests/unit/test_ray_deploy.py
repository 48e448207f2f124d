"""deploy/kuberay/rayservice.yaml: Serve accepts its config, names the application as Atelier looks for
it, and its builder makes the replica Atelier's executor would deploy."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'atelier[ray]'")

from atelier.jobs.ray_executor import app_name
from atelier.jobs.ray_replica import EngineReplica, build_app

MANIFEST = Path(__file__).parents[2] / "deploy" / "kuberay" / "rayservice.yaml"


def documents() -> list[dict]:
    return list(yaml.safe_load_all(MANIFEST.read_text()))


def serve_config() -> dict:
    return yaml.safe_load(documents()[0]["spec"]["serveConfigV2"])


def test_serve_accepts_the_config_and_its_application_is_the_one_atelier_calls():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config())
    (app,) = config.applications
    assert app.name == app_name(app.args["model"])
    module, attr = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    (deployment,) = app.deployments
    assert deployment.name == EngineReplica.__name__
    policy = deployment.autoscaling_config["policy"]["policy_function"]
    module, attr = policy.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_the_api_deployment_uses_the_ray_executor_on_the_same_model():
    api = documents()[1]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in api["env"]}
    assert env["ATELIER_EXECUTOR"] == "ray" and env["ATELIER_RAY_ADDRESS"] == "auto"
    assert app_name(env["ATELIER_MODEL"]) == serve_config()["applications"][0]["name"]


def test_the_builder_binds_a_replica_of_the_named_model_without_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "s" * 40)
    app = build_app({"model": "z-image-turbo", "max_ongoing": "2"})
    bound = app._bound_deployment
    recipe, per = bound.init_args
    assert per == 2 and bound.max_ongoing_requests == 2
    assert recipe.keywords["model"] == "z-image-turbo" and recipe.args[1].openai_api_key is None
    with pytest.raises(ValueError, match="either 'model'"):
        build_app({})
