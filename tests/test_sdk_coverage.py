"""Every public method of tinker's ServiceClient, TrainingClient, SamplingClient and RestClient is either
exercised by a named test with the real SDK (``TESTED``), refused by colo with a 4xx that says why
(``REFUSED``, checked against the service). A method in neither fails this file: a new SDK version is
caught here.

An ``_async`` method counts as its sync twin (the twin calls it, or it the twin).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import tinker
from conftest import ALICE

from colo.service.refusals import REFUSALS, STATUS

SDK_VERSION = "0.38"
CLASSES = (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient)
TESTS = Path(__file__).parent

SVC = "tests/test_service.py"
REST = "tests/test_service_rest.py"
ROUTES = "tests/test_sdk_routes.py"

# method -> the tests that call it through the real SDK against the service
TESTED: dict[str, list[str]] = {
    "ServiceClient.close": [f"{ROUTES}::test_search_sessions_filters_pages_and_shows_how_a_session_ended"],
    "ServiceClient.create_lora_training_client": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "ServiceClient.create_rest_client": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "ServiceClient.create_sampling_client": [f"{ROUTES}::test_get_list_and_assign_project_of_sessions"],
    "ServiceClient.create_training_client_from_state": [
        f"{ROUTES}::test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler"],
    "ServiceClient.create_training_client_from_state_with_optimizer": [
        f"{SVC}::test_save_state_then_load_it_into_the_same_and_into_a_new_training_client"],
    "ServiceClient.get_console_url": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "ServiceClient.get_server_capabilities": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "ServiceClient.get_telemetry": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],

    "TrainingClient.create_sampling_client": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "TrainingClient.forward": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "TrainingClient.forward_backward": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "TrainingClient.get_console_url": [
        f"{ROUTES}::test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler"],
    "TrainingClient.get_info": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "TrainingClient.get_telemetry": [
        f"{ROUTES}::test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler"],
    "TrainingClient.get_tokenizer": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "TrainingClient.load_state": [
        f"{ROUTES}::test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler"],
    "TrainingClient.load_state_with_optimizer": [
        f"{SVC}::test_save_state_then_load_it_into_the_same_and_into_a_new_training_client"],
    "TrainingClient.optim_step": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],
    "TrainingClient.save_state": [f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "TrainingClient.save_weights_and_get_sampling_client": [
        f"{REST}::test_stable_reinforce_trains_on_recorded_sequences_with_the_recorded_logprobs"],
    "TrainingClient.save_weights_for_sampler": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites"],

    "SamplingClient.compute_logprobs": [f"{SVC}::test_sampler_prompt_logprobs_agree_with_trainer",
                                        f"{ROUTES}::test_the_sdks_session_poller_samples_many_at_once_and_reports_failures"],
    "SamplingClient.create": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.from_sampler_handle": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.get_base_model": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.get_sampler_handle": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.get_telemetry": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.get_tokenizer": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.on_queue_state_change": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "SamplingClient.sample": [f"{SVC}::test_sdk_overfits_saves_for_sampler_and_recites",
                              f"{ROUTES}::test_the_sdks_session_poller_samples_many_at_once_and_reports_failures"],

    "RestClient.assign_session_project": [f"{ROUTES}::test_get_list_and_assign_project_of_sessions"],
    "RestClient.delete_checkpoint": [
        f"{ROUTES}::test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler"],
    "RestClient.delete_checkpoint_from_tinker_path": [
        f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "RestClient.get_sampler": [f"{ROUTES}::test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler"],
    "RestClient.get_server_capabilities": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "RestClient.get_session": [f"{REST}::test_a_finished_session_frees_its_models_and_stops_its_heartbeat",
                               f"{ROUTES}::test_get_list_and_assign_project_of_sessions"],
    "RestClient.get_telemetry": [f"{ROUTES}::test_client_side_helpers_and_capabilities"],
    "RestClient.get_training_run": [f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "RestClient.get_training_run_by_tinker_path": [
        f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "RestClient.list_checkpoints": [f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "RestClient.list_sessions": [f"{ROUTES}::test_get_list_and_assign_project_of_sessions"],
    "RestClient.list_training_runs": [f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "RestClient.list_user_checkpoints": [f"{REST}::test_training_runs_and_their_checkpoints_are_listed_and_deleted"],
    "RestClient.search_sessions": [f"{ROUTES}::test_search_sessions_filters_pages_and_shows_how_a_session_ended"],
    # makes no request: it reads the JWT colo never issues, and says so (RuntimeError)
    "RestClient.whoami": [f"{ROUTES}::test_whoami_says_it_needs_jwt_auth_which_colo_does_not_use"],
    # weights out, publishing, copies, custom losses
    "ServiceClient.copy_weights": ["tests/test_external_weights.py::test_weights_info_and_copy_weights"],
    "RestClient.copy_weights": ["tests/test_external_weights.py::test_weights_info_and_copy_weights"],
    "RestClient.get_weights_info_by_tinker_path": ["tests/test_external_weights.py::test_weights_info_and_copy_weights"],
    "TrainingClient.save_weights_external": [
        "tests/test_external_weights.py::test_an_export_is_a_peft_adapter_fetched_through_signed_urls",
        "tests/test_cookbook_weights.py::test_both_paths_download_the_trained_adapter"],
    "RestClient.get_external_weights_urls": [
        "tests/test_external_weights.py::test_an_export_is_a_peft_adapter_fetched_through_signed_urls"],
    "RestClient.publish_checkpoint_from_tinker_path": [
        "tests/test_external_weights.py::test_a_published_checkpoint_is_readable_by_other_tenants_and_only_while_published"],
    "RestClient.unpublish_checkpoint_from_tinker_path": [
        "tests/test_external_weights.py::test_a_published_checkpoint_is_readable_by_other_tenants_and_only_while_published"],
    "RestClient.set_checkpoint_ttl_from_tinker_path": [
        f"{REST}::test_ttl_seconds_expires_a_checkpoint_and_set_ttl_changes_it"],
    "ServiceClient.create_custom_loss": [
        "tests/test_custom_loss.py::test_server_side_loss_matches_the_same_function_run_client_side"],
    "TrainingClient.forward_backward_custom": [
        "tests/test_custom_loss.py::test_server_side_loss_matches_the_same_function_run_client_side",
        f"{SVC}::test_forward_backward_custom_runs_in_the_client_and_trains_as_the_same_loss_on_the_server"],
}

# method -> (the refused route in colo/service/refusals.py, a call of the method)
REFUSED: dict[str, tuple[str, object]] = {
    "RestClient.get_billing_usage": (
        "/api/v1/billing/usage/events", lambda r: r.get_billing_usage("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z")),
    "RestClient.get_current_checkpoint_storage_usage": (
        "/api/v1/billing/usage/checkpoints/current", lambda r: r.get_current_checkpoint_storage_usage()),
    "RestClient.get_audit_log": ("/api/v1/audit", lambda r: r.get_audit_log()),
    "RestClient.export_session_trace": (
        "/api/v1/sessions/{session_id}/trace_export", lambda r: r.export_session_trace("any-session")),
}

def sdk_methods() -> set[str]:
    """``Class.method`` for every public method, an ``_async`` one named by its sync twin."""
    out = set()
    for cls in CLASSES:
        names = {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}
        for n in names:
            twin = n.removesuffix("_async")
            out.add(f"{cls.__name__}.{twin if twin in names else n}")
    return out


def test_the_sdk_is_the_version_this_table_was_made_for():
    assert tinker.__version__.startswith(SDK_VERSION), (
        f"tinker {tinker.__version__}: this table lists SDK {SDK_VERSION}'s methods; check the new ones")


def test_every_public_sdk_method_is_tested_or_refused():
    methods = sdk_methods()
    tables = {"TESTED": TESTED, "REFUSED": REFUSED}
    missing = sorted(m for m in methods if not any(m in t for t in tables.values()))
    assert not missing, f"SDK methods no test exercises and colo does not refuse: {missing}"
    stale = sorted(f"{name}: {m}" for name, t in tables.items() for m in t if m not in methods)
    assert not stale, f"entries for methods the SDK no longer has: {stale}"
    twice = sorted(m for m in methods if sum(m in t for t in tables.values()) > 1)
    assert not twice, f"methods in more than one table: {twice}"


def functions_in(path: str) -> set[str]:
    tree = ast.parse((TESTS.parent / path).read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("method", sorted(TESTED))
def test_each_tested_method_names_tests_that_exist_and_call_it(method):
    name = method.split(".")[1]
    for ref in TESTED[method]:
        path, test = ref.split("::")
        assert (TESTS.parent / path).is_file(), f"{method}: {path} does not exist"
        assert test in functions_in(path), f"{method}: no {test} in {path}"
        # the method's name appears in the test's own source (or a helper it calls in the same file)
        source = (TESTS.parent / path).read_text()
        assert f".{name}(" in source, f"{method}: {path} never calls .{name}("


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_each_refused_method_gets_a_4xx_that_says_why(service, method):
    path, call = REFUSED[method]
    refusal = next((x for x in REFUSALS if x.path == path), None)
    assert refusal is not None, f"{method}: {path} is not in colo/service/refusals.py"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # several refused RestClient calls are deprecated
        future = call(tinker.RestClient(base_url=service.url, api_key=ALICE))
    with pytest.raises(tinker.APIStatusError) as e:
        future.result(timeout=60)
    assert 400 <= e.value.status_code < 500 and e.value.status_code == STATUS
    assert refusal.why in str(e.value) and refusal.what in str(e.value), str(e.value)
