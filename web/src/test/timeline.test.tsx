import { render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Api } from "../api";
import { Timeline } from "../components/Timeline";

afterEach(() => vi.unstubAllGlobals());

describe("Timeline", () => {
  it("lists what happened, in order, from the API's timeline", async () => {
    const entries = [
      { at: "2026-11-27T12:00:00Z", what: "created", detail: "creating" },
      { at: "2026-11-27T12:00:05Z", what: "task", detail: "copied 3 files of tasks/hello" },
      { at: "2026-11-27T12:01:00Z", what: "terminal", detail: "connected: candidate" },
    ];
    const fetch = vi.fn(async () => new Response(JSON.stringify(entries), { status: 200 }));
    vi.stubGlobal("fetch", fetch);
    render(<Timeline api={new Api("sek_x")} id="abc123" live={false} />);
    const items = await screen.findAllByRole("listitem");
    expect(items.map((li) => li.querySelector(".what")?.textContent)).toEqual(["created", "task", "terminal"]);
    expect(items[2].textContent).toContain("connected: candidate");
    expect(fetch).toHaveBeenCalledWith("/api/v1/sandboxes/abc123/timeline", expect.anything());
  });

  it("shows the API's refusal", async () => {
    vi.stubGlobal(
      "fetch",
      vi.fn(async () => new Response(JSON.stringify({ title: "Not Found", detail: "no such sandbox" }), { status: 404 })),
    );
    render(<Timeline api={new Api("sek_x")} id="gone00" live={false} />);
    expect(await screen.findByRole("alert")).toHaveProperty("textContent", "no such sandbox");
  });
});
