"""The AI gateway's pure parts: reading a stream cut anywhere, billing and admission, each
exchange's new messages, the timeline line, the template's claude section, and what a
sandbox's Claude Code is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.ai import budget, transcript
from engine.ai.stream import Assembler, from_message
from engine.ai.workspace import first_screen, gateway_env, home_of, managed_settings
from engine.backend import BackendError, Ran
from engine.backend.docker import bridge_gateway, place
from engine.errors import TemplateError
from engine.model.templates import load

STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {
        "input_tokens": 120, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 30,
        "output_tokens": 1}}},
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking",
                                                                 "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta",
                                                          "thinking": "Let me "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta",
                                                          "thinking": "look. ü"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta",
                                                          "signature": "sig"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta",
                                                          "text": "I'll run it: "}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta",
                                                          "partial_json": '{"command": "ls'}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta",
                                                          "partial_json": ' -la"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
     "usage": {"output_tokens": 10}},
    {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 42}},
    {"type": "message_stop"},
]  # fmt: skip
WIRE = "".join(
    f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n" for e in STREAM
).encode()
EXPECTED_CONTENT = [
    {"type": "thinking", "thinking": "Let me look. ü"},
    {"type": "text", "text": "I'll run it: "},
    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls -la"}},
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(WIRE)])
def test_a_stream_cut_anywhere_reads_the_same(size: int) -> None:
    assembler = Assembler()
    for at in range(0, len(WIRE), size):
        assembler.feed(WIRE[at : at + size])
    answer = assembler.result()
    assert answer.content == EXPECTED_CONTENT
    # Input and cache counts from message_start; output from the last message_delta, which is
    # cumulative: overwritten, never added (10 then 42 is 42).
    assert answer.usage == {
        "input_tokens": 120,
        "cache_read_input_tokens": 900,
        "cache_creation_input_tokens": 30,
        "output_tokens": 42,
    }
    assert (answer.message_id, answer.model, answer.stop_reason) == (
        "msg_1",
        "claude-x",
        "tool_use",
    )
    assert assembler.events == len(STREAM)


def test_crlf_separated_events_and_an_error_event() -> None:
    assembler = Assembler()
    assembler.feed(b'event: ping\r\ndata: {"type": "ping"}\r\n\r\n')
    assembler.feed(b'event: error\r\ndata: {"type": "error", "error": {"type": "overloaded_error",')
    assembler.feed(b' "message": "Overloaded"}}\r\n\r\n')
    answer = assembler.result()
    assert assembler.events == 2
    assert answer.error == {"type": "overloaded_error", "message": "Overloaded"}


def test_a_non_streamed_answer() -> None:
    answer = from_message({"id": "m", "model": "x", "stop_reason": "end_turn",
                           "usage": {"input_tokens": 5, "output_tokens": 7},
                           "content": [{"type": "text", "text": "hi"}]})  # fmt: skip
    assert answer.content == [{"type": "text", "text": "hi"}]
    assert budget.billed(answer.usage) == 12


def test_billing_counts_a_tenth_of_cache_reads() -> None:
    usage = {"input_tokens": 120, "cache_read_input_tokens": 901,
             "cache_creation_input_tokens": 30, "output_tokens": 42}  # fmt: skip
    assert budget.billed(usage) == 120 + 30 + 42 + 91  # 901 / 10, rounded up
    assert budget.reservation(body_bytes=3001, max_tokens=500) == 500 + 1001
    assert budget.admits(used=0, reserved=999, budget=1000)
    assert not budget.admits(used=1, reserved=999, budget=1000)
    assert not budget.admits(used=1000, reserved=0, budget=1000)


def _user(text: str, *, cache: bool = False) -> dict[str, object]:
    block: dict[str, object] = {"type": "text", "text": text}
    if cache:
        block["cache_control"] = {"type": "ephemeral"}
    return {"role": "user", "content": [block]}


def test_each_request_keeps_only_what_it_adds() -> None:
    first = [_user("do it", cache=True), {"role": "system", "content": [{"type": "text",
             "text": "env", "cache_control": {"type": "ephemeral"}}]}]  # fmt: skip
    start, kept = transcript.new_messages(first, None)
    assert (start, kept) == (0, first)
    prior = transcript.prior_of(first)
    answer = {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash",
              "input": {"command": "ls"}}]}  # fmt: skip
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
              "content": "a.txt"}]}  # fmt: skip
    # Claude Code moves its cache markers and sends the system text as a plain string now:
    # still the same history, continued.
    second = [_user("do it"), {"role": "system", "content": "env"}, answer, result]
    start, kept = transcript.new_messages(second, prior)
    assert (start, kept) == (3, [result])  # the answer itself is kept with its exchange
    # A rewritten history (a compaction): kept whole again.
    rewritten = [_user("summary of the conversation"), _user("next")]
    assert transcript.new_messages(rewritten, transcript.prior_of(second)) == (0, rewritten)
    # A shorter one: whole too.
    assert transcript.new_messages(first, transcript.prior_of(second)) == (0, first)


def test_the_timeline_line_says_what_happened() -> None:
    kept = [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>noise</system-reminder>"},
        {"type": "text", "text": "Fix   the\nrate limiter"}]}]  # fmt: skip
    answer = {"content": [{"type": "tool_use", "name": "Bash", "input": {"command": "pytest"}}]}
    line = transcript.summary(kept, answer)
    assert line == 'prompt: Fix the rate limiter; asks for Bash: {"command": "pytest"}'
    result = [{"role": "user", "content": [{"type": "tool_result", "content": [
        {"type": "text", "text": "3 passed"}]}]}]  # fmt: skip
    assert transcript.summary(result, {"content": [{"type": "text", "text": "All green."}]}) == (
        "tool result: 3 passed; answers: All green."
    )
    assert transcript.is_side({"messages": []}) and not transcript.is_side({"tools": [{}]})


def _template(tmp_path: Path, text: str, name: str = "t1") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nbase_image: workspace-base:latest\nresources:\n  cpu_limit: '1'\n"
        "  memory_limit: 1Gi\nttl: 1h\n" + text
    )
    return path


def test_the_claude_section(tmp_path: Path) -> None:
    t = load(_template(tmp_path, "claude:\n  model: claude-x-1\n  budget_tokens: 5000\n"
                                 "  max_tokens: 100\n  settings:\n    permissions:\n"
                                 "      deny: [WebSearch]\n"))  # fmt: skip
    assert (t.claude.access, t.claude.model, t.claude.budget_tokens, t.claude.max_tokens) == (
        "gateway", "claude-x-1", 5000, 100,
    )  # fmt: skip
    assert t.claude.settings == {"permissions": {"deny": ["WebSearch"]}} and not t.warnings
    assert load(_template(tmp_path, "", "t2")).claude.access == "gateway"  # the default


def test_the_old_claude_auth_still_loads_with_a_deprecation(tmp_path: Path) -> None:
    on = load(_template(tmp_path, "claude_auth: true\n", "old1"))
    off = load(_template(tmp_path, "claude_auth: false\n", "old2"))
    assert (on.claude.access, off.claude.access) == ("gateway", "none")
    [warning] = off.warnings
    assert "old2.yaml:7: claude_auth is deprecated" in warning and "access: none" in warning


def test_bad_claude_sections_name_field_and_line(tmp_path: Path) -> None:
    path = _template(tmp_path, "claude:\n  access: everyone\n  model: 'bad model!'\n"
                               "  budget_tokens: -5\n  max_tokens: 999999\n  colour: red\n"
                               "  settings: [1]\n", "bad")  # fmt: skip
    with pytest.raises(TemplateError) as caught:
        load(path)
    found = {(p, line) for p, line, _ in caught.value.problems}
    assert found == {("claude.access", 8), ("claude.model", 9), ("claude.budget_tokens", 10),
                     ("claude.max_tokens", 11), ("claude.colour", 12),
                     ("claude.settings", 13)}  # fmt: skip
    both = _template(tmp_path, "claude_auth: true\nclaude:\n  access: none\n", "both")
    with pytest.raises(TemplateError, match=r"claude_auth: is replaced by claude\.access"):
        load(both)


def test_what_a_sandbox_s_claude_code_is_given(tmp_path: Path) -> None:
    t = load(_template(tmp_path, "claude:\n  model: m-1\n  max_tokens: 77\n  settings:\n"
                                 "    env: {FOO: bar, ANTHROPIC_BASE_URL: http://evil}\n"
                                 "    permissions: {allow: [Bash]}\n", "given"))  # fmt: skip
    env = gateway_env(t, base_url="http://10.0.0.1:8790", token="sgt_x")
    doc = managed_settings(t, env)
    # The engine's env wins over the template's; the rest of the template's settings stay.
    assert doc["env"]["ANTHROPIC_BASE_URL"] == "http://10.0.0.1:8790"
    assert doc["env"]["FOO"] == "bar" and doc["permissions"] == {"allow": ["Bash"]}
    assert doc["env"]["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "m-1"
    assert doc["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "77"
    assert doc["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    # The operator's saved config: only the allow-listed keys, never an account or a key.
    saved = {"theme": "dark", "oauthAccount": {"email": "op@x"}, "primaryApiKey": "sk-ant",
             "mcpServers": {"x": {}}, "projects": {"/": {"allowedTools": ["*"]}},
             "customApiKeyResponses": {"approved": ["x"]}, "verbose": True}  # fmt: skip
    screen = first_screen(saved, "/home/coder/workspace")
    assert screen == {
        "theme": "dark",
        "verbose": True,
        "hasCompletedOnboarding": True,
        "projects": {"/home/coder/workspace": {"hasTrustDialogAccepted": True,
                                               "allowedTools": []}},
    }  # fmt: skip


def test_a_workspace_s_place() -> None:
    attrs = {"NetworkSettings": {"Networks": {
        "sbx-a-net": {"IPAddress": "10.1.0.2", "Gateway": "10.1.0.1"},
        "sandbox-edge": {"IPAddress": "10.212.0.5", "Gateway": "10.212.0.1"}}}}  # fmt: skip
    found = place(attrs, "sbx-a-net")
    assert found.addresses == ("10.1.0.2", "10.212.0.5") and found.host == "10.1.0.1"


def test_the_host_s_address_on_docker_s_default_bridge() -> None:
    assert bridge_gateway([{"Subnet": "10.213.0.0/26", "Gateway": "10.213.0.9"}]) == "10.213.0.9"
    # A dockerd that made docker0 itself (a first start) records the subnet alone.
    assert bridge_gateway([{"Subnet": "10.213.0.0/26"}]) == "10.213.0.1"
    assert bridge_gateway([{"Subnet": "fd00::/64"}, {"Subnet": "172.17.0.0/16"}]) == "172.17.0.1"
    with pytest.raises(BackendError, match="no gateway address"):
        bridge_gateway([])


class _Answers:
    """The backend seam's ``run``, answering from a list (an exec that said nothing first)."""

    def __init__(self, *outputs: bytes) -> None:
        self.outputs = list(outputs)
        self.calls = 0

    def run(self, container: str, argv: list[str], **kwargs: object) -> Ran:
        self.calls += 1
        return Ran(0, self.outputs.pop(0) if self.outputs else b"")


def test_the_home_is_asked_again_when_an_exec_answers_nothing() -> None:
    backend = _Answers(b"", b"/home/coder 1000 1000")
    assert home_of(backend, "c", "coder") == ("/home/coder", 1000, 1000)  # type: ignore[arg-type]
    assert backend.calls == 2
    with pytest.raises(RuntimeError, match="could not read the home of coder"):
        home_of(_Answers(), "c", "coder")  # type: ignore[arg-type]
