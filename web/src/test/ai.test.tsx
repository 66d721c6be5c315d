import { render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Api } from "../api";
import { AiTranscript, isReminder, percent, resultText } from "../components/AiTranscript";

afterEach(() => vi.unstubAllGlobals());

const usage = {
  sandbox_id: "abc123",
  template: "interview-python",
  model: "claude-x",
  max_tokens: 16000,
  budget_tokens: 1500000,
  used_tokens: 375000,
  input_tokens: 300000,
  output_tokens: 70000,
  cache_creation_tokens: 0,
  cache_read_tokens: 50000,
  requests: 12,
  refused: 1,
  sessions: [{ session_id: "s1", started_at: "2026-12-01T10:00:00Z", last_at: "2026-12-01T10:05:00Z", exchanges: 12, refused: 1, billed: 375000, agents: [] }],
};
const exchange = (id: number, extra: object) => ({
  id,
  at: "2026-12-01T10:00:00Z",
  finished_at: "2026-12-01T10:00:02Z",
  session_id: "s1",
  agent_id: null,
  side: false,
  model: "claude-x",
  status: 200,
  refused: null,
  usage: { input_tokens: 100, output_tokens: 20 },
  first_message: 0,
  messages: [],
  answer: null,
  error: null,
  ...extra,
});
const transcript = [
  exchange(1, {
    messages: [
      { role: "user", content: [{ type: "text", text: "<system-reminder>noise</system-reminder>" }, { type: "text", text: "Run the tests" }] },
      { role: "system", content: "environment" },
    ],
    answer: { content: [{ type: "thinking", thinking: "I should run pytest" }, { type: "tool_use", name: "Bash", input: { command: "pytest -q" } }] },
  }),
  exchange(2, {
    first_message: 3,
    messages: [{ role: "user", content: [{ type: "tool_result", content: [{ type: "text", text: "3 passed" }] }] }],
    answer: { content: [{ type: "text", text: "All three tests pass." }] },
  }),
  exchange(3, { side: true, answer: { content: [{ type: "text", text: "A title" }] } }),
  exchange(4, { refused: "budget", status: null, error: "this sandbox's AI budget is used up" }),
];

describe("AiTranscript", () => {
  it("shows usage against the budget and the conversation in order, side calls hidden", async () => {
    const fetch = vi.fn(async (path: string) =>
      new Response(JSON.stringify(path.endsWith("/transcript") ? { items: transcript } : usage), { status: 200 }),
    );
    vi.stubGlobal("fetch", fetch);
    render(<AiTranscript api={new Api("sek_x")} id="abc123" live={false} />);
    expect((await screen.findByText(/of 1,500,000 tokens/)).textContent).toContain("375,000 of 1,500,000 tokens (25%)");
    const items = await screen.findAllByRole("listitem");
    expect(items).toHaveLength(3); // the side call is not shown
    const kinds = [...document.querySelectorAll("[data-kind]")].map((e) => e.getAttribute("data-kind"));
    expect(kinds).toEqual(["prompt", "thinking", "tool_use", "tool_result", "answer"]);
    expect(items[0].textContent).toContain("Run the tests");
    expect(items[0].textContent).not.toContain("noise"); // Claude Code's reminders
    expect(items[0].textContent).not.toContain("environment"); // its system message
    expect(items[0].textContent).toContain('"command": "pytest -q"');
    expect(items[1].textContent).toContain("3 passed");
    expect(items[2].textContent).toContain("refused (budget)");
    expect(screen.queryByText("A title")).toBeNull();
  });

  it("says so when the sandbox has no gateway access", async () => {
    vi.stubGlobal("fetch", vi.fn(async () => new Response(JSON.stringify({ detail: "none" }), { status: 404 })));
    render(<AiTranscript api={new Api("sek_x")} id="abc123" live={false} />);
    expect(await screen.findByText("This sandbox has no AI gateway access.")).toBeTruthy();
  });

  it("reads tool results and reminders, and caps the percentage", () => {
    expect(resultText("plain")).toBe("plain");
    expect(resultText([{ type: "text", text: "a" }, { type: "text", text: "b" }])).toBe("a\nb");
    expect(isReminder({ type: "text", text: "  <system-reminder>x" })).toBe(true);
    expect(isReminder({ type: "text", text: "hello" })).toBe(false);
    expect(percent(150, 100)).toBe(100);
    expect(percent(1, 0)).toBe(0);
  });
});
