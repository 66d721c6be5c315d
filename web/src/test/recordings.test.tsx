import { render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Api, Recording } from "../api";
import { Candidate } from "../components/Candidate";
import { Recordings, sessionLength } from "../components/Recordings";

afterEach(() => vi.unstubAllGlobals());

const recording = (over: Partial<Recording>): Recording => ({
  id: "0123456789abcdef",
  role: "candidate",
  client: "candidate",
  started_at: "2026-11-27T12:00:00Z",
  ended_at: "2026-11-27T12:03:20Z",
  width: 120,
  height: 40,
  bytes: 5000,
  has_input: false,
  download: "/api/v1/sandboxes/abc123/recordings/0123456789abcdef",
  ...over,
});

describe("Recordings", () => {
  it("says how long a session was, or that it is open", () => {
    expect(sessionLength(recording({}))).toBe("3 min 20 s");
    expect(sessionLength(recording({ ended_at: "2026-11-27T12:00:42Z" }))).toBe("42 s");
    expect(sessionLength(recording({ ended_at: null }))).toBe("in progress");
  });

  it("lists the sandbox's sessions with who opened them", async () => {
    const items = [
      recording({}),
      recording({ id: "fedcba9876543210", role: "member", client: "alice", ended_at: null, has_input: true }),
    ];
    const fetch = vi.fn(async () => new Response(JSON.stringify({ items }), { status: 200 }));
    vi.stubGlobal("fetch", fetch);
    render(<Recordings api={new Api("sek_x")} id="abc123" />);
    const rows = await screen.findAllByRole("listitem");
    expect(rows[0].textContent).toContain("candidate");
    expect(rows[1].textContent).toContain("alice (member)");
    expect(rows[1].textContent).toContain("in progress, 120×40, keystrokes");
    expect(screen.getAllByRole("button", { name: /^Replay / })).toHaveLength(2);
    expect(fetch).toHaveBeenCalledWith("/api/v1/sandboxes/abc123/recordings", expect.anything());
  });

  it("reads the list again every 5 s while the sandbox lives, and not after", async () => {
    vi.useFakeTimers({ shouldAdvanceTime: true });
    try {
      for (const live of [true, false]) {
        const fetch = vi.fn(async () => new Response(JSON.stringify({ items: [] }), { status: 200 }));
        vi.stubGlobal("fetch", fetch);
        const { unmount } = render(<Recordings api={new Api("sek_x")} id="abc123" live={live} />);
        await screen.findByText("No recorded sessions yet.");
        await vi.advanceTimersByTimeAsync(11_000);
        expect(fetch).toHaveBeenCalledTimes(live ? 3 : 1);
        unmount();
      }
    } finally {
      vi.useRealTimers();
    }
  });
});

describe("Candidate", () => {
  it("tells the candidate the session is recorded when the template says so", async () => {
    for (const recorded of [true, false]) {
      const view = { id: "abc123", template: "t", state: "failed", expires_at: "2099-01-01T00:00:00Z", endpoints: [], terminal: "/x", recorded };
      vi.stubGlobal("fetch", vi.fn(async () => new Response(JSON.stringify(view), { status: 200 })));
      const { unmount } = render(<Candidate token="sat_x" />);
      await screen.findByText("This workspace is not available.");
      expect(screen.queryByText("This session is recorded") !== null).toBe(recorded);
      unmount();
    }
  });
});
