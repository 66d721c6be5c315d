import { act, fireEvent, render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Sandbox } from "../api";
import { Countdown } from "../components/Countdown";
import { ExpiryBanner } from "../components/ExpiryBanner";
import { SignIn } from "../components/SignIn";
import { stateNote } from "../components/Dashboard";

afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllGlobals();
});

describe("SignIn", () => {
  it("shows the API's reason when a key is refused, and does not sign in", async () => {
    // The one fake: the network seam (fetch) answers as the API does for a revoked key.
    vi.stubGlobal(
      "fetch",
      vi.fn(async () =>
        new Response(JSON.stringify({ title: "Unauthorized", detail: "the API key is missing, unknown or revoked" }), {
          status: 401,
        }),
      ),
    );
    const onSignIn = vi.fn();
    render(<SignIn onSignIn={onSignIn} />);
    fireEvent.change(screen.getByLabelText("API key"), { target: { value: "sek_bad" } });
    fireEvent.click(screen.getByRole("button", { name: "Sign in" }));
    expect(await screen.findByRole("alert")).toHaveProperty("textContent", "the API key is missing, unknown or revoked");
    expect(onSignIn).not.toHaveBeenCalled();
  });

  it("signs in with a key the API accepts", async () => {
    vi.stubGlobal("fetch", vi.fn(async () => new Response(JSON.stringify({ items: [] }), { status: 200 })));
    const onSignIn = vi.fn();
    render(<SignIn onSignIn={onSignIn} />);
    fireEvent.change(screen.getByLabelText("API key"), { target: { value: "  sek_good  " } });
    fireEvent.click(screen.getByRole("button", { name: "Sign in" }));
    await vi.waitFor(() => expect(onSignIn).toHaveBeenCalledWith("sek_good"));
  });
});

describe("Countdown", () => {
  it("ticks every second and turns urgent", () => {
    vi.useFakeTimers();
    vi.setSystemTime(new Date("2026-01-01T12:00:00Z"));
    render(<Countdown until="2026-01-01T12:05:02Z" />);
    expect(screen.getByText("5m 02s").className).toContain("ok");
    act(() => vi.advanceTimersByTime(3000));
    expect(screen.getByText("4m 59s").className).toContain("soon");
  });
});

describe("ExpiryBanner", () => {
  it("explains an expired sandbox", () => {
    render(<ExpiryBanner until="2026-01-01T12:00:00Z" state="expired" />);
    expect(screen.getByRole("status").textContent).toContain("its time ran out");
  });
});

describe("state notes", () => {
  const base = { error: null } as unknown as Sandbox;
  it.each([
    ["expired", "its time ran out; it was destroyed"],
    ["destroyed", "destroyed on request"],
    ["running", ""],
  ])("%s", (state, note) => expect(stateNote({ ...base, state })).toBe(note));
  it("shows a failure's error", () => {
    expect(stateNote({ ...base, state: "failed", error: "image missing" })).toBe("image missing");
  });
});
