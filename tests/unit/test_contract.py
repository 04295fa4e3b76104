"""The sluice.v1 contract: lint-clean, and in step with the domain types it carries."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from guard.moderator import Role, Verdict
from guard.policy import PolicyOptions
from service._pb.sluice.v1 import common_pb2, generation_pb2, moderation_pb2
from service.engine.types import FinishReason, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def signature(field: FieldDescriptor) -> tuple[object, ...]:
    message = field.message_type.full_name if field.message_type else None
    enum = field.enum_type.full_name if field.enum_type else None
    oneof = field.containing_oneof.name if field.containing_oneof else None
    return (field.name, field.number, field.type, field.is_repeated, message, enum, oneof, field.has_presence)


def fields_of(descriptor: Descriptor) -> list[tuple[object, ...]]:
    return [signature(f) for f in descriptor.fields]


def test_buf_lint_is_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    exe = str(buf) if buf.exists() else shutil.which("buf")
    assert exe is not None, "buf not found: the dev extra installs buf-bin"
    result = subprocess.run([exe, "lint"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generate_and_complete_requests_are_field_for_field_identical() -> None:
    generate = fields_of(generation_pb2.GenerateRequest.DESCRIPTOR)
    complete = fields_of(generation_pb2.CompleteRequest.DESCRIPTOR)
    assert generate == complete
    assert len(generate) == 9


def test_finish_reason_covers_the_domain_enum() -> None:
    names = set(generation_pb2.FinishReason.keys())
    expected = {f"FINISH_REASON_{reason.name}" for reason in FinishReason} | {"FINISH_REASON_UNSPECIFIED"}
    assert names == expected
    assert generation_pb2.FinishReason.Value("FINISH_REASON_UNSPECIFIED") == 0


def test_sampling_params_mirror_the_domain_type() -> None:
    proto = {f.name for f in generation_pb2.SamplingParams.DESCRIPTOR.fields}
    domain = {f.name for f in dataclasses.fields(SamplingParams)}
    # logprobs are request-level on the wire (they shape the response, not the sampling).
    assert proto == domain - {"logprobs", "top_logprobs"}
    request_fields = generation_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert {"logprobs", "top_logprobs"} <= set(request_fields)


def test_optional_exactly_where_unset_differs_from_zero() -> None:
    def optional(descriptor: Descriptor) -> set[str]:
        # A proto3 `optional` field lives in a synthetic oneof named after it.
        fields = descriptor.fields
        return {f.name for f in fields if f.containing_oneof and f.containing_oneof.name == f"_{f.name}"}

    assert optional(generation_pb2.SamplingParams.DESCRIPTOR) == {
        "temperature", "top_p", "repetition_penalty", "seed"
    }
    assert optional(generation_pb2.GenerateRequest.DESCRIPTOR) == {"max_new_tokens"}
    assert optional(common_pb2.GuardOptions.DESCRIPTOR) == {
        "input_threshold", "output_threshold", "release_window_tokens"
    }


def test_guard_options_mirror_the_policy_options() -> None:
    proto = {f.name for f in common_pb2.GuardOptions.DESCRIPTOR.fields}
    domain = {f.name for f in dataclasses.fields(PolicyOptions)}
    # fail_open: only turning it off tightens, so the wire carries `fail_closed = true` for fail_open=False.
    assert proto == (domain - {"fail_open"}) | {"fail_closed"}


def test_moderation_roles_match_the_guard_roles() -> None:
    names = set(moderation_pb2.ModerationRole.keys()) - {"MODERATION_ROLE_UNSPECIFIED"}
    assert names == {f"MODERATION_ROLE_{role.name}" for role in Role}


def test_guard_verdict_carries_the_domain_verdict() -> None:
    proto = {f.name for f in common_pb2.GuardVerdict.DESCRIPTOR.fields}
    domain = {f.name for f in dataclasses.fields(Verdict)} - {"stage"}  # the stage is the Final field
    assert proto == {("latency_seconds" if name == "latency" else name) for name in domain}


def test_services_and_methods() -> None:
    generation = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in generation.methods
    }
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Complete": ("CompleteRequest", "CompleteResponse", False),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "GetModelInfoResponse", False),
    }
    moderation = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"]
    assert [(m.name, m.server_streaming) for m in moderation.methods] == [("Moderate", False)]
    assert generation_pb2.DESCRIPTOR.package == "sluice.v1"
    assert generation_pb2.DESCRIPTOR.name == "sluice/v1/generation.proto"  # clean names for reflection


def test_gen_protos_rewrites_imports_and_refuses_unknown_forms(tmp_path: Path) -> None:
    from tools.gen_protos import GenerationError, rewrite_imports

    good = tmp_path / "a_pb2_grpc.py"
    good.write_text("import grpc\nfrom sluice.v1 import a_pb2 as x\n")
    assert rewrite_imports(tmp_path, "service._pb") == 1
    assert good.read_text() == "import grpc\nfrom service._pb.sluice.v1 import a_pb2 as x\n"
    (tmp_path / "b_pb2.py").write_text("import sluice.v1.a_pb2\n")
    with pytest.raises(GenerationError, match="unexpected import form"):
        rewrite_imports(tmp_path, "service._pb")
