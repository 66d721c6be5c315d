import { render, screen, within } from "@testing-library/react";
import { describe, expect, it } from "vitest";
import { Api, Sandbox } from "../api";
import { SandboxTable } from "../components/Dashboard";

function sandbox(id: string, state: string, extra: Partial<Sandbox> = {}): Sandbox {
  return {
    id,
    template: "web",
    state,
    reason: null,
    owner: "trainer",
    created_at: "2026-01-01T12:00:00Z",
    expires_at: new Date(Date.now() + 3600_000).toISOString(),
    destroyed_at: null,
    endpoints: [{ port: 8000, public: true, url: `http://${id}-8000.localhost` }],
    workspace: `sbx-${id}-workspace`,
    error: null,
    links: {},
    ...extra,
  };
}

describe("SandboxTable", () => {
  it("offers what each state allows, and explains the ended ones", () => {
    render(
      <SandboxTable
        api={new Api("sek_x")}
        sandboxes={[
          sandbox("run0000001", "running"),
          sandbox("cre0000001", "creating"),
          sandbox("fai0000001", "failed", { error: "image workspace-x:latest is missing" }),
          sandbox("exp0000001", "expired", { reason: "ttl" }),
        ]}
        onChange={() => {}}
        onError={() => {}}
      />,
    );
    const row = (id: string) => within(document.querySelector(`tr[data-sandbox='${id}']`) as HTMLElement);
    const buttons = (id: string) => row(id).queryAllByRole("button").map((b) => b.textContent);
    expect(buttons("run0000001")).toEqual(["Extend", "Candidate link", "Delete"]);
    expect(buttons("cre0000001")).toEqual([]);
    expect(buttons("fai0000001")).toEqual(["Delete"]);
    expect(buttons("exp0000001")).toEqual([]);
    expect(row("fai0000001").getByText("image workspace-x:latest is missing")).toBeTruthy();
    expect(row("exp0000001").getByText("its time ran out; it was destroyed")).toBeTruthy();
    // A live sandbox counts down; an ended one does not.
    expect(row("run0000001").getByText(/^(59m|1h 00m)/)).toBeTruthy();
    expect(row("exp0000001").queryByText(/\d+m/)).toBeNull();
    // Published ports are links.
    expect(row("run0000001").getByRole("link", { name: ":8000" }).getAttribute("href")).toBe(
      "http://run0000001-8000.localhost",
    );
    expect(screen.getAllByRole("row")).toHaveLength(5);
  });
});
