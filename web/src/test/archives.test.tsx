import { fireEvent, render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Api } from "../api";
import { Archives } from "../components/Archives";
import { SubmitButton } from "../components/SubmitButton";

afterEach(() => vi.unstubAllGlobals());

const archive = {
  id: 7,
  sandbox_id: "abc123",
  reason: "submitted",
  created_at: "2026-11-27T12:00:00Z",
  expires_at: "2026-12-27T12:00:00Z",
  bytes: 34 * 1024,
  files: 12,
  sha256: "00",
  git: "-- git log --oneline\n889511c first",
  notes: null,
  error: null,
  download: "/api/v1/sandboxes/abc123/archives/7",
};

describe("Archives", () => {
  it("lists archives with their size, a download and the git summary; failures say why", async () => {
    const failed = { ...archive, id: 8, reason: "deleted", error: "the workspace container is gone", download: null, git: null };
    const fetch = vi.fn(async () => new Response(JSON.stringify({ items: [archive, failed] }), { status: 200 }));
    vi.stubGlobal("fetch", fetch);
    render(<Archives api={new Api("sek_x")} id="abc123" live={false} />);
    const items = await screen.findAllByRole("listitem");
    expect(items[0].textContent).toContain("12 files, 34 KiB");
    expect(items[0].querySelector("pre")?.textContent).toContain("889511c first");
    expect(screen.getAllByRole("button", { name: "Download" })).toHaveLength(1);
    expect(items[1].textContent).toContain("failed: the workspace container is gone");
    expect(fetch).toHaveBeenCalledWith("/api/v1/sandboxes/abc123/archives", expect.anything());
  });
});

describe("SubmitButton", () => {
  it("asks first, then shows the report", async () => {
    const fetch = vi.fn(async () => new Response(JSON.stringify({ archive, destroyed: false }), { status: 200 }));
    vi.stubGlobal("fetch", fetch);
    const confirm = vi.fn(() => true);
    vi.stubGlobal("confirm", confirm);
    render(<SubmitButton token="sat_abc123.1.x" />);
    fireEvent.click(screen.getByRole("button", { name: "Submit" }));
    expect((await screen.findByRole("status")).textContent).toBe("Submitted: 12 files archived (34 KiB).");
    expect(confirm).toHaveBeenCalled();
    expect(fetch).toHaveBeenCalledWith("/api/v1/access/sat_abc123.1.x/submit", { method: "POST" });
  });

  it("does nothing when the candidate cancels", () => {
    const fetch = vi.fn();
    vi.stubGlobal("fetch", fetch);
    vi.stubGlobal("confirm", vi.fn(() => false));
    render(<SubmitButton token="sat_abc123.1.x" />);
    fireEvent.click(screen.getByRole("button", { name: "Submit" }));
    expect(fetch).not.toHaveBeenCalled();
  });
});
