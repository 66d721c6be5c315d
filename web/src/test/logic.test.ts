import { describe, expect, it } from "vitest";
import { parseEvent, problemOf } from "../api";
import { backoff, retryStatus } from "../components/Terminal";
import { formatLeft, isDuration, urgency } from "../time";

describe("time left", () => {
  it.each([
    [0, "expired"],
    [-5, "expired"],
    [45_000, "45s"],
    [12 * 60_000 + 30_000, "12m 30s"],
    [4 * 3600_000 + 5 * 60_000, "4h 05m"],
  ])("%d ms is %s", (ms, text) => expect(formatLeft(ms)).toBe(text));

  it("warns in the last five minutes", () => {
    expect(urgency(6 * 60_000)).toBe("ok");
    expect(urgency(5 * 60_000)).toBe("soon");
    expect(urgency(0)).toBe("expired");
  });

  it.each([
    ["1h", true],
    ["30m", true],
    ["1h30m", true],
    ["90s", true],
    ["", false],
    ["h", false],
    ["1d", false],
    ["-1h", false],
  ])("%s is a duration: %s", (text, ok) => expect(isDuration(text)).toBe(ok));
});

describe("server-sent events", () => {
  it("reads kind, id and message", () => {
    const e = parseEvent('id: 7\nevent: progress\ndata: {"id": 7, "at": "t", "kind": "progress", "message": "create docker:index/network:Network network"}');
    expect(e).toEqual({ id: 7, kind: "progress", message: "create docker:index/network:Network network", at: "t" });
  });
  it("turns the end event into its state", () => {
    expect(parseEvent('event: end\ndata: {"state": "running"}')?.message).toBe("state running");
  });
  it("ignores a block without data", () => {
    expect(parseEvent(": keep-alive")).toBeNull();
  });
});

describe("problems", () => {
  it("shows the detail of a problem+json answer", async () => {
    const response = new Response(JSON.stringify({ title: "Unprocessable", detail: "ttl: is over the template's max_ttl (8h)" }), {
      status: 422,
      headers: { "Content-Type": "application/problem+json" },
    });
    const error = await problemOf(response);
    expect(error.status).toBe(422);
    expect(error.message).toBe("ttl: is over the template's max_ttl (8h)");
  });
  it("falls back to the status line", async () => {
    const error = await problemOf(new Response("oops", { status: 502, statusText: "Bad Gateway" }));
    expect(error.message).toBe("502 Bad Gateway");
  });
});

describe("reconnecting", () => {
  it("backs off exponentially up to ten seconds", () => {
    expect([0, 1, 2, 3, 10].map(backoff)).toEqual([500, 1000, 2000, 4000, 10_000]);
    expect(retryStatus("", 2000)).toBe("disconnected; reconnecting in 2 s…");
    expect(retryStatus("this session is recorded and its recording cannot be written", 500)).toBe(
      "disconnected (this session is recorded and its recording cannot be written); reconnecting in 1 s…",
    );
  });
});
