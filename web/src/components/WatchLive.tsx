import { useState } from "react";
import { Api } from "../api";
import { Terminal } from "./Terminal";

// A reviewer's read-only view of the candidate's terminal (?mode=watch): the same tmux session,
// attached read-only; nothing typed here reaches it, and its size never changes theirs.
export function WatchLive({ api, id }: { api: Api; id: string }) {
  const [open, setOpen] = useState(false);
  return (
    <section className="watch" aria-label="Watch live">
      <button className="secondary" aria-expanded={open} onClick={() => setOpen(!open)}>
        {open ? "Stop watching" : "Watch live"}
      </button>
      {open && (
        <div className="watch-box">
          <p className="muted">Read-only: you see the candidate's session as it happens.</p>
          <Terminal path={`/api/v1/ws/terminal/${id}?token=${encodeURIComponent(api.key)}&mode=watch`} readOnly />
        </div>
      )}
    </section>
  );
}
